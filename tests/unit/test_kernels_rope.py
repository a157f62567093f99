"""kernels/rope.py against megatron-core's unfused rotary embedding (the function it replaces),
forward and backward; Triton under its interpreter on a CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from kernels.rope import fused_apply_rotary_pos_emb, rotary_embedding
from tests.helpers import DEVICE, REPO

# (s, b, heads, dim, rot_dim, freqs batch): odd head counts, partial rotation (channels passed
# through), one position, per-sequence angles; Llama's 128-wide heads, 40 of them, which take two
# programs per position (32 heads each, the second part-masked); more pass-through channels than
# one block of them.
SHAPES = [
    (7, 2, 3, 16, 16, 1),
    (5, 1, 5, 24, 16, 1),
    (1, 3, 1, 8, 8, 1),
    (4, 2, 6, 32, 32, 2),
    (2, 2, 40, 128, 128, 2),
    (3, 1, 3, 176, 32, 1),
]


def _inputs(s, b, heads, dim, rot_dim, freqs_batch, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(s, b, heads, dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    freqs = (torch.rand(s, freqs_batch, 1, rot_dim, generator=gen) * 6 - 3).to(DEVICE)
    return t, freqs


def _forward_backward(fn, t, freqs):
    out = fn(t, freqs)
    # In t's dtype first: the fp64 reference of a bf16 test gets the same upstream gradient.
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(t).to(out)
    (grad,) = torch.autograd.grad(out, t, grad_out)
    return out, grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_matches_megatron_in_fp32(backend, shape):
    t, freqs = _inputs(*shape, torch.float32)
    expected = _forward_backward(_apply_rotary_pos_emb_bshd, t, freqs)
    got = _forward_backward(lambda x, f: rotary_embedding(x, f, backend=backend), t, freqs)
    for name, g, e in zip(("output", "gradient"), got, expected, strict=True):
        # The PyTorch path is megatron-core's arithmetic in the same order; Triton's cos and sin
        # differ from PyTorch's in the last bit.
        torch.testing.assert_close(g, e, rtol=0, atol=0 if backend == "torch" else 1e-6, msg=name)


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_bf16_rounds_once(shape):
    """bf16: both paths compute in fp32 and round the result once, so each is within one bf16
    unit in the last place of megatron-core's function in fp64 (itself rounded, for the gradient
    of a bf16 input); megatron-core in bf16 rounds cos, sin and each product to bf16 as well, so
    it is within a few."""
    t, freqs = _inputs(*shape, torch.bfloat16)
    exact = _forward_backward(
        lambda x, f: _apply_rotary_pos_emb_bshd(x.double(), f.double()), t, freqs
    )
    reference = _forward_backward(lambda x, f: rotary_embedding(x, f, backend="torch"), t, freqs)
    triton_ = _forward_backward(lambda x, f: rotary_embedding(x, f, backend="triton"), t, freqs)
    megatron = _forward_backward(_apply_rotary_pos_emb_bshd, t, freqs)
    for i, name in enumerate(("output", "gradient")):
        one_ulp = exact[i].double().abs() * 2**-7 + 1e-6
        for path, got in (("torch", reference[i]), ("triton", triton_[i])):
            assert ((got.double() - exact[i]).abs() <= one_ulp).all(), (path, name)
        assert ((megatron[i].double() - exact[i]).abs() <= 4 * one_ulp + 2**-6).all(), name


def test_gradient_is_the_transpose_of_the_forward_map():
    t, freqs = _inputs(3, 2, 2, 12, 8, 1, torch.float64)
    # The PyTorch path in fp64 (Triton computes in fp32); the tests above hold Triton's backward
    # to megatron-core's autograd.
    assert torch.autograd.gradcheck(lambda x: rotary_embedding(x, freqs, backend="torch"), (t,))


def test_strided_input():
    """A query sliced out of a fused QKV projection (strided over heads, contiguous within one),
    a key strided within a head, angles strided within a position."""
    qkv = torch.randn(6, 2, 4, 3 * 16, device=DEVICE)
    query, key = qkv[..., 16:32], qkv[..., 0:32:2]
    freqs = torch.randn(6, 1, 1, 32, device=DEVICE)[..., ::2]
    for t in (query, key):
        expected = _apply_rotary_pos_emb_bshd(t, freqs)
        for backend in ("torch", "triton"):
            got = rotary_embedding(t, freqs, backend=backend)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=backend)


def test_offsets_past_two_to_the_31_elements():
    """Positions 2**30 elements apart (a long context's queries in a fused QKV buffer): 32-bit
    offsets would wrap past the second. A child process, as a wrapped offset can end the
    process; the buffer's pages are never touched except the rows written."""
    script = f"""
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from kernels.rope import rotary_embedding
stride = 2**30
buffer = torch.empty(2 * stride + 64, dtype=torch.bfloat16, device="{DEVICE}")
t = buffer.as_strided((3, 1, 1, 64), (stride, 64, 64, 1))
for position in range(3):
    t[position] = torch.randn(1, 1, 64)
freqs = torch.rand(3, 1, 1, 64, device="{DEVICE}")
expected = _apply_rotary_pos_emb_bshd(t.float(), freqs).to(t.dtype)
got = rotary_embedding(t, freqs, backend="triton")
torch.testing.assert_close(got, expected, atol=2**-6, rtol=2**-7)
print("offsets fine")
"""
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert "offsets fine" in child.stdout, (child.returncode, child.stderr[-2000:])


def test_bad_shapes_and_interleaving_are_refused():
    t = torch.randn(4, 1, 2, 8)
    for width in (10, 0):
        with pytest.raises(ValueError, match="must be even, positive and at most"):
            rotary_embedding(t, torch.randn(4, 1, 1, width))
    with pytest.raises(ValueError, match="does not match"):
        rotary_embedding(t, torch.randn(3, 1, 1, 8))
    with pytest.raises(ValueError, match="4-D"):
        rotary_embedding(t[0], torch.randn(4, 1, 1, 8))
    with pytest.raises(ValueError, match="interleaved"):
        fused_apply_rotary_pos_emb(t, torch.randn(4, 1, 1, 8), interleaved=True)


def test_megatron_core_calls_it_with_apply_rope_fusion(monkeypatch):
    """``use_fused_rope`` fills the slot megatron-core's attention calls for fused RoPE (TE's,
    when TE is there); its ``TransformerConfig`` then accepts ``apply_rope_fusion``."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.model.fusions import transformer_engine_rope, use_fused_rope

    if transformer_engine_rope():
        pytest.skip("Transformer Engine's fused RoPE is installed: it keeps the slot")
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)  # restored afterwards
    settings = dict(num_layers=1, hidden_size=64, num_attention_heads=4, apply_rope_fusion=True)
    with pytest.raises(ValueError, match="apply_rope_fusion is not available"):
        TransformerConfig(**settings)
    use_fused_rope()
    assert not transformer_engine_rope()
    config = TransformerConfig(**settings)
    t, freqs = _inputs(5, 2, 4, 16, 16, 1, torch.bfloat16)
    # The bshd path never uses the context-parallel group; passing one avoids parallel_state.
    dispatched = rope_utils.apply_rotary_pos_emb(t, freqs, config, cp_group=object())
    assert torch.equal(dispatched, rotary_embedding(t, freqs))
    # bf16 tells the two apart: megatron-core's unfused path rounds cos and sin first.
    assert not torch.equal(dispatched, _apply_rotary_pos_emb_bshd(t, freqs))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_second_derivative_is_refused(backend):
    """A gradient penalty (create_graph=True) got no second-order term from the Triton path."""
    t, freqs = _inputs(*SHAPES[0], torch.float32)
    out = rotary_embedding(t, freqs, backend=backend)
    (grad,) = torch.autograd.grad(out.square().sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad.square().sum().backward()
