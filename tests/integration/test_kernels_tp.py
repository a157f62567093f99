"""Kernels against megatron-core's own layers at TP=1 to 4 (gloo ranks on 127.0.0.1).

Each rank builds the same global tensors from a fixed seed, takes its shard, and compares the
Triton path (Triton's interpreter on CPU) and the PyTorch reference with megatron-core's
``vocab_parallel_cross_entropy`` on materialised logits and with ``VocabParallelEmbedding``.
"""

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch.nn import functional as F  # noqa: N812 - the universal alias

import kernels.cross_entropy as ce
from kernels.embedding import FusedVocabParallelEmbedding, vocab_parallel_embedding
from tests.distributed import run_ranks

# gloo ranks on CPU tensors; on a GPU machine the kernels are covered by the unit tests on CUDA.
pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo multi-rank test"),
    pytest.mark.triton_interpreter,
]

# V divides by 1 to 4 and no shard is a whole number of 32-column blocks; N: uneven token chunks.
N, H, V = 23, 16, 204


def global_inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::4] = -100
    return hidden, weight, labels


def shard(weight, rank, world):
    rows = weight.shape[0] // world
    return weight[rank * rows : (rank + 1) * rows]


def megatron_loss_and_grads(hidden, weight_shard, labels, label_smoothing=0.0):
    """Megatron-core's path: column-parallel logits, vocab-parallel CE, masked mean."""
    hidden = hidden.detach().clone().requires_grad_()
    weight_shard = weight_shard.detach().clone().requires_grad_()
    logits = copy_to_tensor_model_parallel_region(hidden) @ weight_shard.t()
    valid = labels != -100
    # Megatron-core has no ignore_index: ignored labels are masked out by the loss mask.
    per_token = vocab_parallel_cross_entropy(
        logits[:, None].float(), labels.where(valid, 0)[:, None], label_smoothing
    ).squeeze(1)
    loss = (per_token * valid).sum() / valid.sum()
    loss.backward()
    return loss.detach(), hidden.grad, weight_shard.grad


def torch_loss_and_grads(
    hidden, weight, labels, rank, world, label_smoothing=0.0, z_loss=0.0, softcap=None, vocab=V
):
    """Global truth on the full fp32 logits with torch's ops; this rank's weight-grad shard.

    ``vocab``: only the weight's first rows are classes (the rest: padding, no gradient).
    """
    hidden = hidden.detach().float().requires_grad_()
    weight = weight.detach().float().requires_grad_()
    logits = hidden @ weight[:vocab].t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    eps = label_smoothing * vocab / (vocab - 1)
    per_token = F.cross_entropy(logits, labels, reduction="none", label_smoothing=eps)
    valid = labels != -100
    per_token = per_token + z_loss * torch.logsumexp(logits, -1).square() * valid
    loss = per_token.sum() / valid.sum()
    loss.backward()
    return loss.detach(), hidden.grad, shard(weight.grad, rank, world)


def fused_loss_and_grads(hidden, weight_shard, labels, backend, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight_shard = weight_shard.detach().clone().requires_grad_()
    loss = ce.fused_linear_cross_entropy(hidden, weight_shard, labels, backend=backend, **kwargs)
    loss.backward()
    return loss.detach(), hidden.grad, weight_shard.grad


def assert_all_close(got, want, tol, what):
    for name, a, b in zip(("loss", "dH", "dW"), got, want, strict=True):
        torch.testing.assert_close(
            a.float(), b.float(), atol=tol, rtol=tol, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def _cross_entropy_rank(rank, world):
    ce.MAX_BLOCK_V = 32  # several vocab blocks per shard, the last one partial
    # Token chunks by the size rule alone (4 rows here), so N=23 ends in a partial chunk.
    ce.MIN_CPU_CHUNK_LOGITS = ce.MIN_GPU_CHUNK_ROWS = 1
    for backend in ("triton", "torch"):
        hidden, weight, labels = global_inputs(torch.float32)
        mine = shard(weight, rank, world)
        fused = fused_loss_and_grads(hidden, mine, labels, backend)
        assert_all_close(
            fused,
            megatron_loss_and_grads(hidden, mine, labels),
            1e-5,
            f"{backend} fp32 vs megatron",
        )

        # Label smoothing: the fused loss is the exact global formula, which is megatron-core's
        # at TP=1; at TP=2 megatron-core smooths over the local partition only.
        fused = fused_loss_and_grads(hidden, mine, labels, backend, label_smoothing=0.1)
        truth = torch_loss_and_grads(hidden, weight, labels, rank, world, label_smoothing=0.1)
        assert_all_close(fused, truth, 1e-5, f"{backend} smoothing vs torch")
        megatron = megatron_loss_and_grads(hidden, mine, labels, label_smoothing=0.1)
        if world == 1:
            assert_all_close(fused, megatron, 1e-5, f"{backend} smoothing vs megatron")
        else:
            assert (megatron[0] - truth[0]).abs() > 1e-4, "megatron-core became exact under TP"

        fused = fused_loss_and_grads(hidden, mine, labels, backend, z_loss=1e-3, softcap=2.0)
        truth = torch_loss_and_grads(hidden, weight, labels, rank, world, z_loss=1e-3, softcap=2.0)
        assert_all_close(fused, truth, 1e-5, f"{backend} z-loss+softcap vs torch")

        # Megatron's padded vocabulary: the last shard's tail rows are no classes, 7 of them at
        # TP=1, all but 5 at TP>1.
        vocab = V - 7 if world == 1 else (world - 1) * (V // world) + 5
        padded_labels = labels.where(labels < vocab, labels % vocab)
        opts = dict(label_smoothing=0.1, z_loss=1e-3)
        fused = fused_loss_and_grads(hidden, mine, padded_labels, backend, vocab_size=vocab, **opts)
        truth = torch_loss_and_grads(
            hidden, weight, padded_labels, rank, world, vocab=vocab, **opts
        )
        assert_all_close(fused, truth, 1e-5, f"{backend} padded vocabulary vs torch")
        assert not fused[2][vocab - rank * (V // world) :].any()
        # A vocabulary that leaves the last rank only padding: every rank refuses alike.
        with pytest.raises(ValueError, match="only padding rows"):
            fused_loss_and_grads(
                hidden, mine, labels.clamp(max=0), backend, vocab_size=(world - 1) * (V // world)
            )

        # Per-token losses: backward recomputes the chunks and all-reduces dH itself.
        hid = hidden.detach().clone().requires_grad_()
        mine_w = mine.detach().clone().requires_grad_()
        per_token = ce.fused_linear_cross_entropy(
            hid, mine_w, labels, reduction="none", z_loss=1e-3, backend=backend
        )
        upstream = torch.randn(N, generator=torch.Generator().manual_seed(5))
        (per_token * upstream).sum().backward()
        ref_h = hidden.detach().clone().requires_grad_()
        ref_w = weight.detach().clone().requires_grad_()
        ref_logits = ref_h @ ref_w.t()
        valid = labels != -100
        ref = F.cross_entropy(ref_logits, labels, reduction="none")
        ref = ref + 1e-3 * torch.logsumexp(ref_logits, -1).square() * valid
        (ref * upstream).sum().backward()
        assert_all_close(
            (per_token.detach(), hid.grad, mine_w.grad),
            (ref.detach(), ref_h.grad, shard(ref_w.grad, rank, world)),
            1e-5,
            f"{backend} reduction=none vs torch",
        )

        # bf16: megatron-core upcasts the bf16 logits to fp32, as the fused kernels do per block.
        hidden, weight, labels = global_inputs(torch.bfloat16)
        mine = shard(weight, rank, world)
        fused = fused_loss_and_grads(hidden, mine, labels, backend)
        assert_all_close(
            fused,
            megatron_loss_and_grads(hidden, mine, labels),
            2e-2,
            f"{backend} bf16 vs megatron",
        )

        # Per-token losses, as megatron-core's compute_language_model_loss returns them.
        per_token = ce.fused_linear_cross_entropy(
            hidden, mine, labels, reduction="none", backend=backend
        )
        assert per_token.shape == (N,) and not per_token[::4].any()


def _embedding_rank(rank, world):
    config = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True)
    for sequence_parallel in (False, True):
        kwargs = dict(
            init_method=torch.nn.init.normal_,
            config=config,
            reduce_scatter_embeddings=sequence_parallel,
        )
        theirs = VocabParallelEmbedding(V, H, **kwargs)
        ours = FusedVocabParallelEmbedding(V, H, **kwargs)
        ours.load_state_dict(theirs.state_dict())
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        meta = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
        ours_sharded = ours.sharded_state_dict(prefix="emb.", metadata=meta)
        theirs_sharded = theirs.sharded_state_dict(prefix="emb.", metadata=meta)
        assert ours_sharded.keys() == theirs_sharded.keys()
        assert ours_sharded["emb.weight"].global_shape == theirs_sharded["emb.weight"].global_shape

        gen = torch.Generator().manual_seed(1)
        # 12 positions: sequence parallelism scatters them evenly over up to 4 ranks.
        ids = torch.randint(0, V, (2, 12), generator=gen)
        ids[0, :4] = V - 1  # repeated row on the last shard
        boundaries = [r * V // world + d for r in range(1, world) for d in (-1, 0)]
        ids[1, : 2 + len(boundaries)] = torch.tensor([0, V - 1, *boundaries])
        out_theirs = theirs(ids)
        upstream = torch.randn(out_theirs.shape, generator=gen)
        out_theirs.backward(upstream)
        out_ours = ours(ids)
        out_ours.backward(upstream)
        torch.testing.assert_close(out_ours, out_theirs, atol=0, rtol=0)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-6, rtol=1e-6)

        # The functional form with each backend, and trainable_rows against megatron's gradient
        # restricted to the new rows.
        new_rows = (V // 2 - 10, V)  # starts inside a shard, as 32,000 does at TP=8
        for backend in ("triton", "torch"):
            weight = ours.weight.detach().clone().requires_grad_()
            out = vocab_parallel_embedding(
                ids,
                weight,
                vocab_start=ours.vocab_start_index,
                trainable_rows=new_rows,
                sequence_parallel=sequence_parallel,
                backend=backend,
            )
            out.backward(upstream)
            torch.testing.assert_close(out, out_theirs, atol=0, rtol=0)
            global_rows = torch.arange(weight.shape[0]) + ours.vocab_start_index
            trainable = global_rows >= new_rows[0]
            assert torch.count_nonzero(weight.grad[~trainable]) == 0
            torch.testing.assert_close(
                weight.grad[trainable], theirs.weight.grad[trainable], atol=1e-6, rtol=1e-6
            )


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_cross_entropy_matches_megatron(world):
    run_ranks(_cross_entropy_rank, world)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_embedding_matches_megatron(world):
    run_ranks(_embedding_rank, world)
