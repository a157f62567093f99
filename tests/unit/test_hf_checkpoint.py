"""Reading Hugging Face checkpoints: every container, and errors that name the file or tensor."""

import json

import pytest
import torch

from megatron_ext.arch import ArchitectureError, LlamaArch
from megatron_ext.checkpoint.hf import CheckpointError, HFCheckpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize(
    ("safe", "shard"), [(True, None), (True, "40KB"), (False, None), (False, "40KB")],
    ids=["safetensors", "safetensors-sharded", "bin", "bin-sharded"],
)  # fmt: skip
def test_every_container_reads_the_same_tensors(tmp_path, model, safe, shard):
    kwargs = {"safe_serialization": safe}
    if shard:
        kwargs["max_shard_size"] = shard
    model.save_pretrained(tmp_path, **kwargs)
    checkpoint = HFCheckpoint(tmp_path)
    if shard:
        assert len(set(checkpoint.files.values())) > 1
    expected = model.state_dict()
    assert set(checkpoint.files) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(checkpoint.get(name), tensor), name


def test_missing_shard_is_named(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shard\\(s\\) missing: .*{victim}"):
        HFCheckpoint(tmp_path)


def test_parallel_sizes_must_divide_heads_groups_and_layers():
    arch = LlamaArch(64, 4, 8, 2, 128, 300)
    arch.check_parallel(2, 2)
    with pytest.raises(
        ArchitectureError, match="must divide the 8 attention heads and the 2 query"
    ):
        arch.check_parallel(4, 1)
    with pytest.raises(ArchitectureError, match="must divide the 4 layers"):
        arch.check_parallel(1, 3)
    # 0 would divide by zero further on.
    with pytest.raises(ArchitectureError, match=r"parallel-size \(0\) and .* at least 1"):
        arch.check_parallel(0, 1)
    with pytest.raises(ArchitectureError, match=r"divisible-by \(0\).*must be at least 1"):
        arch.padded_vocab_size(1, 0)


def test_every_tensor_parallel_rank_must_hold_a_real_id(tmp_path, model):
    """The loss leaves padding rows out: a rank of padding alone would have no classes."""
    arch = LlamaArch(64, 4, 8, 2, 128, 300)
    arch.check_vocab_split(arch.padded_vocab_size(2), 2)  # 512 rows: 256 + 44 ids, 212 padding
    with pytest.raises(ArchitectureError, match="300 ids padded to 512 rows leaves the last of 4"):
        arch.check_vocab_split(512, 4)  # 3 x 128 rows before the last rank's
    # Refused by conversion too, before anything is written: 100 ids padded to 512 at TP=2.
    from megatron_ext.checkpoint.convert import hf_to_megatron

    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ArchitectureError, match="100 ids padded to 512 rows leaves the last of 2"):
        hf_to_megatron(
            tmp_path / "hf",
            tmp_path / "out",
            tensor_model_parallel_size=2,
            make_vocab_size_divisible_by=256,
        )
    assert not (tmp_path / "out").exists()
