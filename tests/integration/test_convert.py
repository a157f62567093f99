"""HF -> megatron-core (dist checkpoint) -> HF, against transformers' own model."""

import pytest
import torch

from megatron_ext.checkpoint.hf import CheckpointError, HFCheckpoint
from tests.distributed import run_ranks
from tests.integration.test_llama_equivalence import tiny_llama

transformers = pytest.importorskip("transformers")


def convert(rank, world_size, hf_dir, out_dir, kwargs):
    from megatron_ext.checkpoint.convert import hf_to_megatron

    return hf_to_megatron(hf_dir, out_dir, **kwargs)


def export(rank, world_size, ckpt_dir, out_dir):
    from megatron_ext.checkpoint.convert import megatron_to_hf

    megatron_to_hf(ckpt_dir, out_dir)


def logits_from_checkpoint(rank, world_size, ckpt_dir, tokens):
    from megatron_ext.arch import LlamaArch
    from megatron_ext.checkpoint.convert import load_into, read_metadata
    from megatron_ext.model.gpt import build_gpt_model

    meta = read_metadata(ckpt_dir)
    arch = LlamaArch(**meta["arch"])
    model = build_gpt_model(
        arch, arch.transformer_config(world_size, 1, params_dtype=torch.float32),
        meta["padded_vocab_size"], parallel_output=False,
    ).eval()  # fmt: skip
    load_into(model, ckpt_dir)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, attention_mask=None)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    tiny_llama(kv_heads=2).save_pretrained(directory)
    return directory


def test_convert_load_at_tp2_and_export_round_trip(tmp_path, hf_dir):
    ckpt = tmp_path / "mcore"
    meta = run_ranks(convert, 1, hf_dir, ckpt, {"tensor_model_parallel_size": 2, "dtype": "fp32"})[
        0
    ]
    assert (meta["vocab_size"], meta["padded_vocab_size"]) == (300, 512)

    reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(tokens).logits
    for logits in run_ranks(logits_from_checkpoint, 2, ckpt, tokens):
        torch.testing.assert_close(logits[..., :300], expected, rtol=0, atol=1e-4)
        assert torch.all(logits[..., 300:] == 0)  # zero padding rows: logit exactly 0

    run_ranks(export, 1, ckpt, tmp_path / "back")
    back = HFCheckpoint(tmp_path / "back")
    original = HFCheckpoint(hf_dir)
    assert set(back.files) == set(original.files)
    for name in original.files:
        assert torch.equal(back.get(name), original.get(name)), name
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert exported.config.vocab_size == 300
    assert exported.config.num_key_value_heads == 2


def test_bad_checkpoints_are_named(tmp_path, hf_dir):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["vocab_size"] = 301  # the classic 32000/32001 mismatch
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight has shape \(300, 64\)"):
        HFCheckpoint(broken)
    config.update(vocab_size=300, model_type="mistral")
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type is 'mistral'"):
        HFCheckpoint(broken)
    config["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        HFCheckpoint(broken)
