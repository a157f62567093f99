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


def test_damaged_files_are_named_in_one_line(tmp_path, model):
    """safetensors' and torch's own messages name no file, and some were tracebacks."""
    import pickle
    import shutil

    model.save_pretrained(tmp_path / "good", max_shard_size="40KB")
    index_name = "model.safetensors.index.json"
    index = json.loads((tmp_path / "good" / index_name).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]

    def broken(name: str, change) -> HFCheckpoint:
        directory = tmp_path / name
        shutil.copytree(tmp_path / "good", directory)
        change(directory)
        return HFCheckpoint(directory)

    def cut(directory):
        path = directory / shard
        path.write_bytes(path.read_bytes()[:-100])

    def garbage(directory):
        (directory / shard).write_bytes(b"\xff" * 64)

    def no_weight_map(directory):
        (directory / index_name).write_text(json.dumps({"metadata": {}}))

    def wrong_shard(directory):
        moved = dict(index["weight_map"])
        name = next(n for n, f in moved.items() if f != shard)
        moved[name] = shard
        (directory / index_name).write_text(json.dumps({"weight_map": moved}))

    def damaged_config(directory):
        (directory / "config.json").write_text('{"model_type": "llama",\n')

    def no_heads(directory):
        config = json.loads((directory / "config.json").read_text())
        del config["num_attention_heads"]
        (directory / "config.json").write_text(json.dumps(config))

    cases = {
        "cut": (cut, f"{shard}: cannot be read, damaged or cut short"),
        "garbage": (garbage, f"{shard}: cannot be read, damaged or cut short"),
        "no_weight_map": (no_weight_map, f"{index_name}: no weight_map"),
        "wrong_shard": (wrong_shard, f"{shard}: has no tensor .* though the index says it has"),
        "damaged_config": (damaged_config, "config.json: damaged, not JSON"),
        "no_heads": (no_heads, "config.json: missing num_attention_heads"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            broken(name, change)

    # A .bin that unpickles to something besides tensors: refused, never run, named; and one in
    # the format before torch 1.6, which cannot be memory-mapped.
    (tmp_path / "pickled").mkdir()
    shutil.copy(tmp_path / "good" / "config.json", tmp_path / "pickled")
    weights = tmp_path / "pickled" / "pytorch_model.bin"
    torch.save({"model.norm.weight": print}, weights)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused, it holds objects other"):
        HFCheckpoint(tmp_path / "pickled")
    with open(weights, "wb") as f:
        pickle.dump({"model.norm.weight": torch.zeros(2)}, f)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: in torch's format from before 1"):
        HFCheckpoint(tmp_path / "pickled")


def test_rope_of_transformers_5_and_earlier_configs():
    """transformers 5 writes rope_parameters and no top-level rope_theta (was read as 10,000)."""
    base = LlamaArch(64, 4, 8, 2, 128, 300).to_hf_config()
    del base["rope_parameters"], base["rope_theta"]
    assert LlamaArch.from_hf_config(base).rope_theta == 10000.0
    assert LlamaArch.from_hf_config({**base, "rope_theta": 5e5}).rope_theta == 5e5
    new = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert LlamaArch.from_hf_config(new).rope_theta == 1e6
    for scaled in (
        {**base, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
        {**base, "rope_scaling": {"type": "linear", "factor": 2.0}},
    ):
        with pytest.raises(ArchitectureError, match="RoPE scaling .* is not supported"):
            LlamaArch.from_hf_config(scaled)
    with pytest.raises(ArchitectureError, match="rope_theta 10000.0 and .* 1000000.0 disagree"):
        LlamaArch.from_hf_config({**new, "rope_theta": 1e4})
    written = LlamaArch(64, 4, 8, 2, 128, 300, rope_theta=1e6).to_hf_config()
    assert LlamaArch.from_hf_config(written).rope_theta == 1e6
    assert transformers.LlamaConfig(**written).rope_parameters["rope_theta"] == 1e6


@pytest.mark.parametrize(
    "left_out", ["rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "rope_theta"]
)
def test_a_key_left_out_of_config_json_means_what_transformers_reads(left_out):
    """A trimmed config converted with Llama-2's eps 1e-5 where transformers runs 1e-6: other
    logits, and the export wrote the wrong value back."""
    written = LlamaArch(64, 4, 8, 2, 128, 300, rope_theta=5e5, norm_eps=1e-5).to_hf_config(
        max_position_embeddings=4096, tie_word_embeddings=True
    )
    del written[left_out], written["rope_parameters"]
    arch = LlamaArch.from_hf_config(written)
    loaded = LlamaArch.from_hf_config(transformers.LlamaConfig(**written).to_dict())
    assert arch == loaded


def test_config_json_values_of_the_wrong_type_are_named():
    written = LlamaArch(64, 4, 8, 2, 128, 300).to_hf_config()
    for key, value, message in (
        ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, got 'false'"),
        ("num_hidden_layers", 0, "num_layers must be an integer of at least 1, got 0"),
        ("rms_norm_eps", -1e-6, "norm_eps must be a finite number above 0"),
        ("vocab_size", 300.0, "vocab_size must be an integer of at least 1, got 300.0"),
        ("num_attention_heads", 0, "num_attention_heads must be an integer of at least 1, got 0"),
    ):
        with pytest.raises(ArchitectureError, match=f"^config.json: {message}"):
            LlamaArch.from_hf_config({**written, key: value})


def test_a_tied_checkpoint_may_hold_its_output_layer_as_a_copy(tmp_path, model):
    """Some exports write the tied matrix twice; a copy that differs is refused, not guessed."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    config = {**model.config.to_dict(), "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    checkpoint = HFCheckpoint(tmp_path)
    assert checkpoint.arch.tie_word_embeddings
    tensors["lm_head.weight"][3, 0] += 1.0
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens"):
        HFCheckpoint(tmp_path)
