"""HF -> megatron-core (dist checkpoint) -> HF, against transformers' own model."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from megatron_ext.checkpoint.hf import CheckpointError, HFCheckpoint
from megatron_ext.commands.options import INPUT_REFUSED
from megatron_ext.hashing import pieces_sha256
from tests.distributed import run_ranks
from tests.integration.test_llama_equivalence import tiny_llama

transformers = pytest.importorskip("transformers")


def convert(rank, world_size, hf_dir, out_dir, kwargs):
    from megatron_ext.checkpoint.convert import hf_to_megatron

    return hf_to_megatron(hf_dir, out_dir, **kwargs)


def export(rank, world_size, ckpt_dir, out_dir, kwargs=None):
    from megatron_ext.checkpoint.convert import megatron_to_hf

    return megatron_to_hf(ckpt_dir, out_dir, **(kwargs or {}))


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
    layout = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "dtype": "fp32"}
    meta = run_ranks(convert, 1, hf_dir, ckpt, layout)[0]
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


def test_rope_base_is_read_from_either_config_form_and_scaling_refused(tmp_path):
    """transformers 5 writes rope_parameters and no top-level rope_theta: a base of 1e6 was
    read as the default 10,000, and converted and exported as another model without a word."""
    import json

    model = tiny_llama(kv_heads=2, rope_theta=1e6)
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tokens = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(tokens).logits
    forms = {"as saved": config}
    if "rope_parameters" in config:  # transformers 5; the older form too
        older = {k: v for k, v in config.items() if k != "rope_parameters"}
        forms["top-level rope_theta"] = {**older, "rope_theta": 1e6}
    for name, form in forms.items():
        hf = tmp_path / name.replace(" ", "_")
        shutil.copytree(tmp_path / "hf", hf)
        (hf / "config.json").write_text(json.dumps(form))
        ckpt, back = tmp_path / f"{hf.name}_mcore", tmp_path / f"{hf.name}_back"
        run_ranks(convert, 1, hf, ckpt, {"dtype": "fp32"})
        logits = run_ranks(logits_from_checkpoint, 1, ckpt, tokens)[0]
        torch.testing.assert_close(logits[..., :300], expected, rtol=0, atol=1e-4, msg=name)
        run_ranks(export, 1, ckpt, back)
        exported = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
        with torch.no_grad():
            torch.testing.assert_close(exported(tokens).logits, expected, msg=name)

    scaled = tmp_path / "scaled"
    shutil.copytree(tmp_path / "hf", scaled)
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}
    (scaled / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    with pytest.raises(CheckpointError, match="RoPE scaling .* is not supported"):
        HFCheckpoint(scaled)


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


def _load_with_vocab(rank, world_size, ckpt_dir, padded_vocab):
    from megatron_ext.arch import LlamaArch
    from megatron_ext.checkpoint.convert import load_into, read_metadata
    from megatron_ext.model.gpt import build_gpt_model

    arch = LlamaArch(**read_metadata(ckpt_dir)["arch"])
    config = arch.transformer_config(1, 1, params_dtype=torch.float32)
    load_into(build_gpt_model(arch, config, padded_vocab), ckpt_dir)


def test_a_checkpoint_is_not_loaded_into_a_model_of_another_shape(tmp_path, hf_dir):
    """torch's reader would load the overlap: the first 256 of 384 rows, without a word."""
    ckpt = tmp_path / "ckpt"
    meta = run_ranks(convert, 1, hf_dir, ckpt, {"dtype": "fp32"})[0]
    run_ranks(_load_with_vocab, 1, ckpt, meta["padded_vocab_size"])
    shapes = r"embedding.word_embeddings.weight is \[384, 64\] there but \[256, 64\] in the model"
    with pytest.raises(AssertionError, match=f"CheckpointError: .*{shapes}"):
        run_ranks(_load_with_vocab, 1, ckpt, 256)


@pytest.fixture(scope="module")
def tokenizers_300(tmp_path_factory, corpora):
    """A 300-piece base tokenizer (the tiny model's vocabulary) and an extension of it."""
    import sentencepiece as spm

    from megatron_ext.tokenizer.sp_proto import Piece, parse_model
    from tests.helpers import read_texts

    directory = tmp_path_factory.mktemp("sp300")
    text = directory / "text.txt"
    text.write_text(
        "\n".join(t.replace("\n", " ") for t in read_texts(corpora / "en" / "valid.jsonl"))
    )
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(directory / "base"), model_type="bpe", vocab_size=300,
        byte_fallback=True, split_digits=True, minloglevel=2, character_coverage=0.98,
        normalization_rule_name="identity",  # as Llama's, which Hugging Face files reproduce
    )  # fmt: skip
    proto = parse_model((directory / "base.model").read_bytes())
    lowest = min(p.score for p in proto.pieces)
    for i, word in enumerate(["▁the", "▁and", "▁of", "ing", "▁kingdom", "▁كتاب", "تاب"]):
        if all(p.piece != word for p in proto.pieces):
            proto.pieces.append(Piece(word, lowest - 1 - i))
    (directory / "expanded.model").write_bytes(proto.serialize())
    return directory / "base.model", directory / "expanded.model"


def test_vocabulary_expansion_keeps_old_logits_and_inits_new_rows(tmp_path, hf_dir, tokenizers_300):
    import shutil

    import sentencepiece as spm

    base, expanded = tokenizers_300
    hf_with_tokenizer = tmp_path / "hf"
    shutil.copytree(hf_dir, hf_with_tokenizer)
    shutil.copy(base, hf_with_tokenizer / "tokenizer.model")
    expanded_sp = spm.SentencePieceProcessor(model_file=str(expanded))
    new_size = len(expanded_sp)
    assert new_size > 300

    for method in ("avg_subwords", "mean"):
        ckpt = tmp_path / method
        kwargs = {"tokenizer_model": str(expanded), "embedding_init": method, "dtype": "fp32"}
        meta = run_ranks(convert, 1, hf_with_tokenizer, ckpt, kwargs)[0]
        assert meta["vocab_size"] == new_size and meta["padded_vocab_size"] == 384
        # What train compares its tokenizer with: the expanded one's pieces, not the base's.
        pieces = [expanded_sp.id_to_piece(i) for i in range(new_size)]
        assert meta["tokenizer_pieces_sha256"] == pieces_sha256(pieces)
        tokens = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(5))
        (logits,) = run_ranks(logits_from_checkpoint, 1, ckpt, tokens)
        reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
        with torch.no_grad():
            expected = reference(tokens).logits
        torch.testing.assert_close(logits[..., :300], expected, rtol=0, atol=1e-4)

        run_ranks(export, 1, ckpt, tmp_path / f"{method}_hf")
        exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{method}_hf")
        assert exported.config.vocab_size == new_size
        emb = exported.get_input_embeddings().weight.detach()
        old = reference.get_input_embeddings().weight.detach()
        assert torch.equal(emb[:300], old)
        if method == "mean":
            torch.testing.assert_close(emb[300:], old.mean(0).expand(new_size - 300, -1))
        else:  # a word-initial piece is the mean of what the base tokenizer splits the word into
            new_sp = spm.SentencePieceProcessor(model_file=str(expanded))
            base_sp = spm.SentencePieceProcessor(model_file=str(base))
            for i in range(300, new_size):
                piece = new_sp.id_to_piece(i)
                if piece.startswith("▁"):
                    parts = base_sp.encode(piece[1:])
                    torch.testing.assert_close(emb[i], old[parts].mean(0))
        out = exported.generate(tokens[:, :4], max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 7)


def test_tokenizer_must_extend_the_checkpoint(tmp_path, hf_dir, tokenizers_300, llama2_tokenizer):
    from megatron_ext.checkpoint.convert import _vocabulary_plan

    base, expanded = tokenizers_300
    hf = HFCheckpoint(hf_dir)
    with pytest.raises(CheckpointError, match="base tokenizer is needed"):
        _vocabulary_plan(hf, str(expanded), None)
    with pytest.raises(CheckpointError, match="must extend the base"):
        _vocabulary_plan(hf, str(llama2_tokenizer), str(base))
    from megatron_ext.tokenizer.sp_proto import parse_model

    proto = parse_model(base.read_bytes())
    del proto.pieces[290:]
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(proto.serialize())
    with pytest.raises(CheckpointError, match="290 pieces, fewer than the checkpoint's vocabulary"):
        _vocabulary_plan(hf, str(truncated), str(base))


def test_export_checks_its_tokenizer_and_points_into_a_run_directory(
    tmp_path, hf_dir, tokenizers_300
):
    from megatron_ext.checkpoint.convert import megatron_to_hf, read_metadata

    checkpoint = tmp_path / "run" / "iter_0000005"  # where megatron-ext train saves
    run_ranks(convert, 1, hf_dir, checkpoint, {"dtype": "fp32"})
    with pytest.raises(CheckpointError, match=r"not found .*e\.g\. .*run/iter_0000005"):
        read_metadata(tmp_path / "run")
    # Copied next to the weights, a tokenizer of another size would pass for the model's.
    _, expanded = tokenizers_300
    with pytest.raises(CheckpointError, match=r"expanded\.model: 30\d pieces, but .* of 300"):
        megatron_to_hf(checkpoint, tmp_path / "back", tokenizer_model=str(expanded))
    assert not (tmp_path / "back").exists()


def test_conversion_refuses_what_would_lose_or_mislabel_weights(tmp_path, hf_dir, tokenizers_300):
    """Found by a reviewer: --force deleted the input when --output-dir named it (a training
    run, or the HF checkpoint); a tokenizer of the same size but other pieces was exported with
    the weights; fp16 turned large weights into infinities; and the exported tokenizer had no
    Hugging Face files, so it added no <s>."""
    import json

    import sentencepiece as spm
    from safetensors.torch import save_file

    from megatron_ext.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_ext.outputs import OutputHoldsInputError
    from megatron_ext.tokenizer.sp_proto import parse_model

    base, _ = tokenizers_300
    hf = tmp_path / "hf"
    shutil.copytree(hf_dir, hf)
    shutil.copy(base, hf / "tokenizer.model")
    with pytest.raises(OutputHoldsInputError, match="--output-dir .* is the input --hf-dir"):
        hf_to_megatron(hf, hf, force=True)
    with pytest.raises(OutputHoldsInputError, match="--output-dir .* holds the input --hf-dir"):
        hf_to_megatron(hf, tmp_path, force=True)
    weights = load_file(hf / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tensor model.norm.weight has 1 NaN or infinite"):
        HFCheckpoint(hf).get("model.norm.weight")
    with pytest.raises(AssertionError, match="model.norm.weight has 1 NaN or infinite values"):
        run_ranks(convert, 1, hf, tmp_path / "nan", {"dtype": "fp32"})
    weights["model.norm.weight"][0] = 1e5  # beyond fp16's 65,504
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    checkpoint = tmp_path / "run" / "iter_0000001"
    run_ranks(convert, 1, hf, checkpoint, {"dtype": "fp32"})

    with pytest.raises(OutputHoldsInputError, match="holds the input --megatron-dir"):
        megatron_to_hf(checkpoint, tmp_path / "run", force=True)
    assert (checkpoint / "megatron_ext.json").is_file()
    proto = parse_model(base.read_bytes())
    proto.pieces[299].piece = "▁zqxj"  # same size, one piece another
    other = tmp_path / "other.model"
    other.write_bytes(proto.serialize())
    with pytest.raises(CheckpointError, match="as many pieces as .* but other ones"):
        megatron_to_hf(checkpoint, tmp_path / "back", tokenizer_model=str(other))
    overflow = "model.norm.weight cast to torch.float16 has 1 NaN or infinite values"
    with pytest.raises(AssertionError, match=overflow):
        run_ranks(export, 1, checkpoint, tmp_path / "fp16", {"dtype": "fp16"})
    assert not (tmp_path / "fp16").exists()

    back = tmp_path / "back"
    kwargs = {"dtype": "bf16", "tokenizer_model": str(base)}
    assert run_ranks(export, 1, checkpoint, back, kwargs)[0]["tokenizer_files_skipped"] is None
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(back / "model-00001-of-00001.safetensors")["lm_head.weight"].dtype == (
        torch.bfloat16
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(back)
    sp = spm.SentencePieceProcessor(model_file=str(base))
    for text in ("Hello world", "All human beings are born free and equal."):
        assert tokenizer(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)]
    # Batched generate pads with <unk>, as Llama-2's own files do (the tokenizer has no pad).
    generation = transformers.GenerationConfig.from_pretrained(back)
    assert (generation.bos_token_id, generation.eos_token_id) == (sp.bos_id(), sp.eos_id())
    assert generation.pad_token_id == sp.unk_id() and sp.pad_id() == -1


def test_cli_round_trip(tmp_path, hf_dir):
    import subprocess
    import sys

    cli = [sys.executable, "-m", "megatron_ext.cli", "convert"]
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    to_mc = cli + ["hf-to-megatron", "--hf-dir", str(hf_dir), "--output-dir", str(ckpt),
                   "--tensor-model-parallel-size", "2", "--dtype", "fp32"]  # fmt: skip
    result = subprocess.run(to_mc, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "vocab 300 -> 300 (padded 512, TP 2, new rows none), float32 -> fp32," in result.stdout
    # Megatron-LM's tools/checkpoint/convert.py names for the same flags.
    megatron_lm = cli + ["hf-to-megatron", "--load-dir", str(hf_dir), "--save-dir", str(ckpt),
                         "--target-tensor-parallel-size", "2"]  # fmt: skip
    again = subprocess.run(megatron_lm, capture_output=True, text=True)
    assert again.returncode == INPUT_REFUSED
    assert f"already exists (pass --force to overwrite): {ckpt}" in again.stderr
    to_hf = cli + ["megatron-to-hf", "--megatron-dir", str(ckpt), "--output-dir", str(back)]
    result = subprocess.run(to_hf, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert transformers.AutoConfig.from_pretrained(back).vocab_size == 300
    assert not list(tmp_path.glob("*.tmp.*"))
    # A training run's --save directory: the checkpoint its pointer names is exported.
    run, from_run = tmp_path / "run", tmp_path / "from_run"
    shutil.copytree(ckpt, run / "iter_0000003")
    (run / "iter_0000003" / "train_state.json").write_text("{}")
    (run / "latest_checkpointed_iteration.txt").write_text("3\n")
    to_hf_run = cli + ["megatron-to-hf", "--megatron-dir", str(run), "--output-dir", str(from_run)]
    result = subprocess.run(to_hf_run, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"exporting its latest checkpoint, {run / 'iter_0000003'}" in result.stdout
    for weights in back.glob("*.safetensors"):
        expected, exported = load_file(weights), load_file(from_run / weights.name)
        assert all(torch.equal(exported[name], tensor) for name, tensor in expected.items())
    # A checkpoint cut short (an interrupted copy): one line naming it, no traceback.
    for shard in ckpt.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:1000])
    result = subprocess.run([*to_hf, "--force"], capture_output=True, text=True)
    assert result.returncode == INPUT_REFUSED
    assert result.stderr.startswith(f"megatron-ext convert: error: {ckpt}: cannot load (Checkpoi")
    assert "Traceback" not in result.stderr
    # Without its common part, megatron-core's own error is an AttributeError of its error path.
    (ckpt / "common.pt").unlink()
    result = subprocess.run([*to_hf, "--force"], capture_output=True, text=True)
    assert result.returncode == INPUT_REFUSED
    assert result.stderr.strip().splitlines()[-1] == (
        f"megatron-ext convert: error: {ckpt}: no common.pt there (damaged or incomplete)"
    )


def full_size_shapes(rank, world_size, preset):
    """Our mapping of a full-size HF model (meta tensors) against megatron-core's own shapes."""
    from megatron_ext.arch import PRESETS
    from megatron_ext.checkpoint.convert import _meta_model
    from megatron_ext.checkpoint.layout import hf_layer_to_megatron
    from tests.helpers import tensor_parallel_shards

    arch = PRESETS[preset]
    arch.check_parallel(8, 4)
    config = transformers.LlamaConfig(**arch.to_hf_config())
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config).state_dict()
    padded = arch.padded_vocab_size(8)
    model = _meta_model(arch, padded, torch.bfloat16)
    reference = {k: v.shape for k, v in model.state_dict().items() if "_extra_state" not in k}
    ours = {}
    for layer in range(arch.num_layers):
        ours.update({k: v.shape for k, v in hf_layer_to_megatron(hf.__getitem__, layer, arch)})
    layer_keys = {k for k in reference if k.startswith("decoder.layers.")}
    assert layer_keys == set(ours)
    assert all(ours[k] == reference[k] for k in ours)
    assert reference["embedding.word_embeddings.weight"] == (padded, arch.hidden_size)
    # Layer 0 splits evenly over TP=8.
    for name, tensor in hf_layer_to_megatron(hf.__getitem__, 0, arch):
        shards = tensor_parallel_shards(name, tensor, 8)
        assert len({s.shape for s in shards}) == 1
        replicated = name.endswith("layernorm.weight")
        assert shards[0].numel() * (1 if replicated else 8) == tensor.numel(), name


@pytest.mark.parametrize("preset", ["llama2-7b", "llama2-13b", "llama2-70b"])
def test_full_size_mappings_on_meta_device(preset):
    run_ranks(full_size_shapes, 1, preset)


def pipeline_logits(rank, world_size, ckpt_dir, tokens):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext.arch import LlamaArch
    from megatron_ext.checkpoint.convert import load_into, read_metadata
    from megatron_ext.model.gpt import build_gpt_model

    meta = read_metadata(ckpt_dir)
    arch = LlamaArch(**meta["arch"])
    config = arch.transformer_config(
        1, world_size, params_dtype=torch.float32, pipeline_dtype=torch.float32
    )
    last = parallel_state.is_pipeline_last_stage()
    model = build_gpt_model(
        arch, config, meta["padded_vocab_size"], parallel_output=False,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=last,
    ).eval()  # fmt: skip
    load_into(model, ckpt_dir)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)

    def step(data_iterator, model):
        output = model(next(data_iterator), positions, attention_mask=None)
        return output, lambda out: (out.sum() * 0, {"logits": out})

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=[model],
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
            forward_only=True,
        )  # fmt: skip
    return outputs[0]["logits"] if last else None


def test_pipeline_parallel_logits(tmp_path, hf_dir):
    ckpt = tmp_path / "mcore"
    run_ranks(convert, 1, hf_dir, ckpt, {"pipeline_model_parallel_size": 2, "dtype": "fp32"})
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(4))
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        expected = reference(tokens).logits
    first, last = run_ranks(pipeline_logits, 2, ckpt, tokens, pipeline_model_parallel_size=2)
    assert first is None
    torch.testing.assert_close(last[..., :300], expected, rtol=0, atol=1e-4)


def test_a_run_directory_is_refused_naming_a_whole_checkpoint_in_it(tmp_path):
    """A run's directory given for one checkpoint: the hint names one that is whole."""
    from megatron_ext.checkpoint.convert import read_metadata

    for name in ("iter_0000002", "iter_0000003.deleting", "iter_0000004.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "megatron_ext.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"e\.g\. .*/iter_0000002$"):
        read_metadata(tmp_path)
