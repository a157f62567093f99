"""Training config: YAML + Megatron-LM overrides, stages, errors that name the setting."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from megatron_ext.training.config import (
    ConfigError,
    StageConfig,
    config_dict,
    load_config,
    parse_overrides,
    resume_changes,
)
from tests.helpers import REPO

# The two settings validate() requires; the files need not exist.
REQUIRED = ["--data-path", "x", "--tokenizer-model", "t.model"]


def test_overrides_use_megatron_flag_names_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_iters: 10\nlr: 1.0e-3\nbf16: false\n")
    config = load_config(
        path,
        ["--train-iters", "25", "--lr", "2e-4", "--bf16", "--data-path", "0.25", "a", "0.75", "b"],
    )
    assert config.train_iters == 25 and config.lr == 2e-4 and config.bf16 is True
    assert config.data_blend == (["a", "b"], [0.25, 0.75])


def test_dataset_names_strip_the_shared_prefix():
    config = load_config(
        None,
        ["--data-path", "0.3", "d/corpus_en_text_document", "0.7", "d/corpus_ar_text_document"],
    )
    assert config.dataset_names() == ["en", "ar"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train-iter", "5"], "did you mean --train-iters"),
        (["--train-iters", "five"], "--train-iters expects int"),
        (["--lr", "1", "2"], "takes one value"),
        (["oops"], "expected a --flag"),
        # Infinite rates destroyed the weights and the run exited 0.
        (["--lr", "inf"], "--lr expects a finite float, got 'inf'"),
        (["--lr=1e400"], "--lr expects a finite float"),
        # Megatron-LM's flags that work otherwise here say how (was "did you mean
        # --recompute-num-layers?" and "--lr-wsd-decay-iters?").
        (["--num-layers", "4"], "--num-layers is not a setting here: the architecture comes"),
        (["--lr-decay-iters", "9"], "the learning rate decays until the end of each stage"),
        # Were "did you mean --tensor-model-parallel-size?" and "--overlap-param-gather?".
        (["--ckpt-fully-parallel-save"], "always megatron-core's dist_checkpointing"),
        (["--override-opt_param-scheduler"], "not needed: a resumed run takes the new schedule"),
        (["--finetune"], "--pretrained-checkpoint starts a new run"),
        (["--train-samples", "9"], "the schedule counts iterations"),
        (["--use-flash-attn"], r"unknown setting '--use-flash-attn'$"),
    ],
)
def test_bad_overrides_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides(argv)


def test_flag_equals_value_as_argparse_reads_it():
    assert parse_overrides(
        ["--train-iters=10", "--data-path=0.3", "a", "0.7", "b", "--bf16=false", "--seed", "3"]
    ) == {"train_iters": 10, "data_path": ["0.3", "a", "0.7", "b"], "bf16": False, "seed": 3}


def test_help_lists_every_setting_with_its_description():
    from megatron_ext.commands.train import build_parser
    from megatron_ext.training.config import TrainConfig

    text = build_parser().format_help()
    for setting in dataclasses.fields(TrainConfig):
        flag = "--" + setting.name.replace("_", "-")
        assert f"\n  {flag}" in text, flag
    assert "  --seq-length (default 256)\n      Tokens per sequence." in text


def test_a_setting_given_twice_in_the_yaml_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("lr: 1.0e-4\ntrain_iters: 5\nlr: 3.0e-4\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: line 3: 'lr' is given twice"):
        load_config(path)


def test_a_yaml_data_path_string_is_read_as_the_command_line_would(tmp_path):
    path = tmp_path / "blend.yaml"
    path.write_text('data_path: "0.25 data/en 0.75 data/ar"\n')
    assert load_config(path).data_path == ["0.25", "data/en", "0.75", "data/ar"]


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trian_iters: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown setting 'trian_iters'"):
        load_config(path)


def test_resume_changes_name_what_differs_from_the_checkpoint(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "train_iters: 100\nlr: 3.0e-4\nstages:\n"
        "  - {name: emb, train_iters: 20, trainable: embeddings}\n  - {name: full}\n"
    )
    argv = [*REQUIRED[2:], "--data-path", "0.25", "en", "0.75", "ar"]
    # What a checkpoint holds: the configuration through JSON.
    saved = json.loads(json.dumps(config_dict(load_config(path, argv))))
    assert resume_changes(saved, load_config(path, argv)) == []  # a re-queued job
    # Settings that leave the saved state's meaning alone say nothing.
    assert resume_changes(saved, load_config(path, [*argv, "--save-interval", "5"])) == []

    blend = ["--data-path", "0.5", "en", "0.5", "ar", "--seq-length", "512"]
    (data,) = resume_changes(saved, load_config(path, [*argv, *blend]))
    assert "--data-path 0.25 en 0.75 ar -> 0.5 en 0.5 ar, --seq-length 256 -> 512" in data
    assert "data position" in data

    (schedule,) = resume_changes(saved, load_config(path, [*argv, "--train-iters", "200"]))
    assert schedule.startswith("warning: resuming with --train-iters 100 -> 200: the learning")

    stages = tmp_path / "stages.yaml"
    stages.write_text(path.read_text().replace("train_iters: 20", "train_iters: 30"))
    (changed,) = resume_changes(saved, load_config(stages, argv))
    assert "--stages (emb: 20, full: rest -> emb: 30, full: rest)" in changed


def test_the_same_data_by_another_path_is_no_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    argv = [*REQUIRED[2:], "--data-path", "0.25", str(tmp_path / "data" / "en"), "0.75", "ar"]
    saved = json.loads(json.dumps(config_dict(load_config(None, argv))))
    for en in ("data/en", "./link/en"):
        again = [*REQUIRED[2:], "--data-path", "0.25", en, "0.75", "./ar"]
        assert resume_changes(saved, load_config(None, again)) == [], en
    other = [*REQUIRED[2:], "--data-path", "0.25", "data/de", "0.75", "ar"]
    assert "data position" in resume_changes(saved, load_config(None, other))[0]


def test_stages_inherit_and_the_last_runs_to_train_iters(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "lr: 3.0e-4\nweight_decay: 0.1\ntrain_iters: 100\nstages:\n"
        "  - {name: emb, train_iters: 20, trainable: embeddings, lr: 1.0e-3}\n"
        "  - {name: full}\n"
    )
    first, last = load_config(path, ["--train-iters", "50"]).resolved_stages()
    assert (first.train_iters, first.lr, first.weight_decay) == (20, 1e-3, 0.1)
    assert (last.train_iters, last.lr, last.trainable) == (30, 3e-4, "all")
    with pytest.raises(ConfigError, match="stage 'full' gets -5 iterations"):
        load_config(path, ["--train-iters", "15"]).resolved_stages()


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        # Was "gets 0 iterations: the stages need more than train_iters=100".
        (
            "  - {name: emb, train_iters: 0, trainable: embeddings}\n  - {name: full}\n",
            "stage 'emb': train_iters must be at least 1, got 0",
        ),
        # Metrics and the report would merge the two.
        ("  - {name: a, train_iters: 10}\n  - {name: a}\n", "two stages are named 'a'"),
        # The last stage's 30 used to become 90 without a word.
        (
            "  - {name: a, train_iters: 10}\n  - {name: b, train_iters: 30}\n",
            "the stages add up to 40 iterations but --train-iters is 100: leave train_iters out "
            "of the last stage \\('b'\\)",
        ),
        (
            "  - {name: a, lr_decay_style: cosin}\n",
            "stage 'a': lr_decay_style 'cosin' is not one of cosine, linear",
        ),
    ],
)
def test_stage_mistakes_are_named(tmp_path, stages, message):
    path = tmp_path / "s.yaml"
    path.write_text("train_iters: 100\nstages:\n" + stages)
    with pytest.raises(ConfigError, match=message):
        load_config(path, REQUIRED).validate(1)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # Trained all 5 iterations as one stage, then crashed in megatron-core: nothing saved.
        ("train_iters: 2.5", r"s\.yaml: stages\[0\]: train_iters expects int, got 2\.5"),
        ("train_iters: ten", "train_iters expects int, got 'ten'"),
        ("lr: abc", r"stages\[0\]: lr expects a finite float, got 'abc'"),
        ("lr: .inf", "lr expects a finite float"),
        ("new_rows_only: maybe", "new_rows_only expects bool"),
        ("train_iters: true", r"stages\[0\]: train_iters expects int, got True"),
        ("trainable: null", r"stages\[0\]: trainable needs a value, got null"),
    ],
)
def test_stage_values_are_typed_where_they_are_read(tmp_path, setting, message):
    path = tmp_path / "s.yaml"
    path.write_text(f"train_iters: 5\nstages:\n  - name: a\n    {setting}\n  - name: b\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        # Trained at sequence length 1 (Python's True is 1).
        ("seq_length: true", r"c\.yaml: --seq-length expects int, got True"),
        ("lr: false", "--lr expects a finite float, got False"),
        # Ran unseeded: two runs of one config gave other losses.
        ("seed: null", r"c\.yaml: --seed needs a value, got null"),
        # Each ended in a TypeError traceback.
        ("micro_batch_size: ~", "--micro-batch-size needs a value, got null"),
        ("split: null", "--split needs a value"),
        ("data_path: null", "--data-path needs a value"),
    ],
)
def test_yaml_booleans_and_nulls_are_not_numbers_or_defaults(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_settings_that_may_be_unset_take_null(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("save: null\nrecompute_granularity: ~\nstages:\n  - {name: a, lr: null}\n")
    config = load_config(path, REQUIRED)
    assert config.save is None and config.stages[0].lr is None
    config.validate(1)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("tie_word_embeddings: maybe", "arch: tie_word_embeddings expects bool, got 'maybe'"),
        ("norm_eps: abc", "arch: norm_eps expects a finite float, got 'abc'"),
        ("norm_eps: 0", "arch: norm_eps must be a finite number above 0, got 0.0"),
        ("num_layers: 0", "arch: num_layers must be an integer of at least 1, got 0"),
        ("num_layers: 4.5", "arch: num_layers expects int, got 4.5"),
        ("num_layers: true", "arch: num_layers expects int, got True"),
    ],
)
def test_architecture_fields_are_typed_and_in_range(tmp_path, field, message):
    from megatron_ext.training.model import resolve_arch

    path = tmp_path / "c.yaml"
    path.write_text(f"arch: {{preset: tiny, {field}}}\n")
    with pytest.raises(ConfigError, match=message):
        resolve_arch(load_config(path, REQUIRED), 2000, None)


def test_architecture_fields_read_as_the_command_line_would(tmp_path):
    from megatron_ext.arch import PRESETS
    from megatron_ext.training.model import resolve_arch

    path = tmp_path / "c.yaml"
    # 'no' made a tied model, trained and saved: the string is truthy.
    path.write_text("arch: {preset: tiny, hidden_size: '512', tie_word_embeddings: 'no'}\n")
    arch = resolve_arch(load_config(path, REQUIRED), 2000, None).arch
    tiny = PRESETS["tiny"]
    assert arch == dataclasses.replace(tiny, hidden_size=512, vocab_size=2000)


def test_stage_booleans_read_as_the_run_settings_do(tmp_path):
    path = tmp_path / "s.yaml"
    # A quoted "no" was truthy: the stage would have frozen the base rows.
    path.write_text('stages:\n  - {name: a, new_rows_only: "no", train_iters: "3"}\n')
    (stage,) = load_config(path).stages
    assert (stage.new_rows_only, stage.train_iters) == (False, 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # 0 would divide by zero (world size, log interval) or train on empty sequences.
        (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size must be at least 1"),
        (["--log-interval", "0"], "--log-interval must be at least 1, got 0"),
        (["--base-vocab-size", "-5"], "--base-vocab-size must be at least 1, got -5"),
        (["--base-vocab-size", "0"], "--base-vocab-size must be at least 1, got 0"),
        (["--seq-length", "0"], "--seq-length must be at least 1"),
        (["--eval-iters", "0"], "--eval-iters must be at least 1"),
        (["--lr", "-1"], "--lr must be at least 0, got -1.0"),
        (["--clip-grad", "-1"], "--clip-grad must be at least 0"),
        (["--save-interval", "-5"], "--save-interval must be at least 0"),
        (["--adam-beta2", "1"], "--adam-beta2 must be below 1"),
        # numpy's RandomState, which shuffles the data, stopped on a bare ValueError.
        (["--seed", "-1"], "--seed must be at least 0, got -1"),
        (["--seed", str(2**32)], "--seed must be at most 4294967295, got 4294967296"),
        (["--adam-eps", "0"], "--adam-eps must be above 0"),
        (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins must be above 0"),
        # megatron-core's scheduler would fail later on a bare assertion.
        (["--lr", "1e-4", "--min-lr", "1e-3"], "min_lr 0.001 is above its lr 0.0001"),
        # WSD: the anneal's length is needed and must fit the stage.
        (["--lr-decay-style", "WSD"], "WSD needs lr_wsd_decay_iters of at least 1"),
        (["--lr-wsd-decay-iters", "5"], "--lr-wsd-decay-iters needs --lr-decay-style WSD"),
        (
            ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "95", "--lr-warmup-iters", "10"],
            "10 warm-up and 95 anneal iterations exceed its 100",
        ),
        (["--lr-wsd-decay-style", "cubic"], "--lr-wsd-decay-style must be one of exponential"),
        # Was "(use lr_warmup_iters < train_iters)", naming a stage setting no one had set.
        (
            ["--lr-warmup-iters", "100"],
            "^--lr-warmup-iters 100 leaves none of --train-iters 100 to decay: raise "
            "--train-iters to at least 101, or lower --lr-warmup-iters$",
        ),
        # Stages are mappings: they cannot come from the command line.
        (["--stages", "foo"], "command line: stages\\[0\\]: a stage is a mapping"),
    ],
)
def test_validate_names_a_setting_out_of_range(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*REQUIRED, *argv]).validate(1)


@pytest.mark.parametrize(
    ("data_path", "message"),
    [
        # megatron-core's blend reader: a bare AssertionError for these two.
        ("-0.25 a/en 0.75 a/ar", "a/en has weight -0.25; weights must be positive"),
        ("0 a/en 1 a/ar", "a/en has weight 0; weights must be positive"),
        ("nan a/en 1 a/ar", "a/en has weight nan"),
        # ... and 0.25 read as a prefix here.
        ("0.25 a/en a/ar", "give a weight before every prefix"),
        ("a/en 0.75 a/ar", "give a weight before every prefix"),
        # The blend would be all a/en, and its validation reported once.
        ("0.25 a/en 0.75 ./a/en", "lists ./a/en twice"),
        ("1 a/en_text_document 1 b/en_text_document", "both be reported as 'en'"),
    ],
)
def test_data_path_mistakes_are_named(data_path, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*REQUIRED, "--data-path", *data_path.split()]).validate(1)


@pytest.mark.parametrize("split", ["-1,2,0", "a,b,c", "0,0,0", "98,2,0,1", "98,,2", ""])
def test_a_split_megatron_would_misread_or_fail_on_is_named(split):
    # megatron-core: 1,2,0 for the first; NaN, NaN, AssertionError for the next three.
    with pytest.raises(ConfigError, match=f"--split {split}: give up to three shares"):
        load_config(None, [*REQUIRED, "--split", split]).validate(1)
    for good in ("98,2,0", "98,2", "99.5, 0.5, 0", "969/30/1"):
        load_config(None, [*REQUIRED, "--split", good]).validate(1)


@pytest.mark.parametrize("split", ["100", "100,0,0", "99,0,1"])
def test_a_run_without_validation_data_is_refused(split):
    """Per-language validation is how a run is watched; held-out sets stand in for the split's."""
    with pytest.raises(ConfigError, match=f"--split {split} leaves no validation data"):
        load_config(None, [*REQUIRED, "--split", split]).validate(1)
    config = load_config(None, [*REQUIRED, "--split", split, "--valid-data-path", "h/en"])
    config.validate(1)
    assert config.validation_sets() == {"en": ("h/en", True)}


@pytest.mark.parametrize("split", ["0,100,0", "0,1", "0,0,1"])
def test_a_split_without_a_training_share_is_refused(split):
    # megatron-core builds no training set: a TypeError at the first step.
    argv = [*REQUIRED, "--split", split, "--valid-data-path", "h/en"]
    with pytest.raises(ConfigError, match=f"--split {split} gives training no share"):
        load_config(None, argv).validate(1)


def test_validation_sets_are_the_splits_then_the_held_out_datasets():
    argv = ["--tokenizer-model", "t.model", "--data-path", "0.3", "d/blend_en", "0.7", "d/blend_ar"]
    held_out = ["--valid-data-path", "h/flores_ar_text_document", "h/flores_en_text_document"]
    config = load_config(None, [*argv, *held_out, "--valid-data-names", "ar_flores", "en_flores"])
    config.validate(1)
    assert config.validation_sets() == {
        "en": ("d/blend_en", False),
        "ar": ("d/blend_ar", False),
        "ar_flores": ("h/flores_ar_text_document", True),
        "en_flores": ("h/flores_en_text_document", True),
    }
    # Without names the held-out sets would also be reported as "ar" and "en".
    with pytest.raises(ConfigError, match="h/flores_ar_text_document would be reported as 'ar'"):
        load_config(None, [*argv, *held_out]).validate(1)
    with pytest.raises(ConfigError, match="--valid-data-names has 1 names for 2 datasets"):
        load_config(None, [*argv, *held_out, "--valid-data-names", "flores"]).validate(1)
    config = load_config(None, [*argv, *held_out, "--split", "100,0,0"])
    config.validate(1)
    assert list(config.validation_sets()) == ["ar", "en"]


@pytest.mark.parametrize(
    ("held_out", "message"),
    [
        # Megatron-LM's blend syntax: each held-out set is reported on its own instead.
        (["1", "h/en"], "give prefixes without weights"),
        (["h/en", "./h/en"], "lists ./h/en twice"),
        # The run would train on it.
        (["./x"], "./x is in --data-path too"),
        ([os.path.abspath("x")], f"{os.path.abspath('x')} is in --data-path too"),
        (["a/en_text_document", "b/en_text_document"], "both be reported as 'en'"),
    ],
)
def test_valid_data_path_mistakes_are_named(held_out, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*REQUIRED, "--valid-data-path", *held_out]).validate(1)


def test_a_held_out_dataset_linked_to_a_training_dataset_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "h").mkdir()
    for suffix in (".bin", ".idx"):
        (tmp_path / "d" / f"en{suffix}").write_bytes(b"")
        (tmp_path / "h" / f"x{suffix}").symlink_to(tmp_path / "d" / f"en{suffix}")
    argv = ["--data-path", str(tmp_path / "d" / "en"), "--tokenizer-model", "t.model"]
    with pytest.raises(ConfigError, match=r"h/x is in --data-path too"):
        load_config(None, [*argv, "--valid-data-path", str(tmp_path / "h" / "x")]).validate(1)


def test_data_path_forms_megatron_reads():
    for data_path in ("a/en a/ar", "0.25 a/en 0.75 a/ar", "30 a/en 70 a/ar"):
        load_config(None, [*REQUIRED, "--data-path", *data_path.split()]).validate(1)
    names = ["--data-names", "en1", "en2"]
    both = ["--data-path", "1", "a/en_text_document", "1", "b/en_text_document"]
    load_config(None, [*REQUIRED, *both, *names]).validate(1)


def test_validate_checks_batch_and_layout():
    with pytest.raises(ConfigError, match="not a multiple of --micro-batch-size 3 x 2"):
        batch = ["--micro-batch-size", "3", "--global-batch-size", "8"]
        load_config(None, [*REQUIRED, *batch]).validate(2)
    with pytest.raises(ConfigError, match="3 processes cannot be split"):
        load_config(None, [*REQUIRED, "--tensor-model-parallel-size", "2"]).validate(3)
    for tp, pp, nodes in ((4, 5, 5), (8, 4, 4), (8, 3, 3), (2, 6, 3)):
        layout = [f"--tensor-model-parallel-size={tp}", f"--pipeline-model-parallel-size={pp}"]
        with pytest.raises(ConfigError, match=f"multiple of {tp * pp}: {nodes} nodes of 8 GPUs"):
            load_config(None, [*REQUIRED, *layout]).validate(16)
        load_config(None, [*REQUIRED, *layout]).validate(8 * nodes)  # the advice works
    with pytest.raises(ConfigError, match="--seq-length 127 is not a multiple of 2"):
        sequence_parallel = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
        load_config(None, [*REQUIRED, *sequence_parallel, "--seq-length", "127"]).validate(2)
    with pytest.raises(ConfigError, match="--ddp-bucket-size needs --overlap-grad-reduce"):
        load_config(None, [*REQUIRED, "--ddp-bucket-size", "1000000"]).validate(1)
    for flags in (
        ["--overlap-param-gather"],
        ["--overlap-param-gather", "--overlap-grad-reduce", "--use-distributed-optimizer", "false"],
    ):
        with pytest.raises(ConfigError, match="--overlap-param-gather needs --use-distributed-opt"):
            load_config(None, [*REQUIRED, *flags]).validate(1)
    fully = "--dist-ckpt-optim-fully-reshardable"
    with pytest.raises(ConfigError, match=f"{fully} needs --use-distributed-optimizer"):
        load_config(None, [*REQUIRED, fully, "--use-distributed-optimizer", "false"]).validate(1)
    one_rank = "--distrib-optim-fully-reshardable-mem-efficient"
    with pytest.raises(ConfigError, match=f"{one_rank} needs {fully}"):
        load_config(None, [*REQUIRED, one_rank]).validate(1)
    load_config(None, [*REQUIRED, fully, one_rank]).validate(1)
    with pytest.raises(ConfigError, match="--ddp-bucket-size must be at least 1, got 0"):
        overlap = ["--overlap-grad-reduce", "--ddp-bucket-size", "0"]
        load_config(None, [*REQUIRED, *overlap]).validate(1)
    config = load_config(None, REQUIRED)
    config.stages = [StageConfig(name="x", new_rows_only=True)]
    with pytest.raises(ConfigError, match="new_rows_only needs trainable=embeddings"):
        config.validate(1)
    config.stages = [StageConfig(name="x", trainable="embeddings", new_rows_only=True)]
    with pytest.raises(ConfigError, match="new_rows_only needs weight_decay: 0"):
        config.validate(1)


def test_trainer_checks_the_layout_before_splitting_the_processes(monkeypatch):
    """One process at TP=2: the config's message, not megatron-core's bare RuntimeError."""
    from megatron_ext.training.loop import Trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = load_config(None, [*REQUIRED, "--tensor-model-parallel-size", "2"])
    with pytest.raises(ConfigError, match="1 processes cannot be split.*--nproc-per-node 2"):
        Trainer(config)


def test_trainer_refuses_an_output_directory_it_cannot_create(tmp_path, monkeypatch):
    """At the start, not at the first save after hours of training."""
    from megatron_ext.training.loop import Trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "file").write_text("")
    for flag in ("--save", "--tensorboard-dir"):
        config = load_config(None, [*REQUIRED, flag, str(tmp_path / "file" / "run")])
        with pytest.raises(ConfigError, match=f"^{flag} .*file/run: cannot create it"):
            Trainer(config)


def test_an_unwritable_index_cache_is_named_with_its_flag(tmp_path):
    """megatron-core's own error names its config attribute; on rank 0 only, the others wait."""
    from megatron_ext.training.data import index_cache_dir

    for suffix in (".bin", ".idx"):
        (tmp_path / f"en{suffix}").write_bytes(b"")
    (tmp_path / "file").write_text("")
    prefix = str(tmp_path / "en")
    config = load_config(None, ["--data-cache-path", str(tmp_path / "file" / "cache")])
    with pytest.raises(ConfigError, match=r"dataset index cache .*file/cache/\w+ \(--data-cache-"):
        index_cache_dir(config, [prefix])
    # The default sits beside the data, often on read-only storage.
    (tmp_path / "cache").write_text("")
    with pytest.raises(ConfigError, match=r"\(the default, beside the data\).*--data-cache-path"):
        index_cache_dir(load_config(None, []), [prefix])
    (tmp_path / "cache").unlink()
    assert Path(index_cache_dir(load_config(None, []), [prefix])).is_dir()


def test_an_architecture_beside_a_checkpoint_must_be_the_checkpoints(tmp_path):
    from dataclasses import asdict

    from megatron_ext.arch import PRESETS
    from megatron_ext.training.model import resolve_arch

    arch = PRESETS["tiny"].with_vocab_size(2000)
    meta = {"arch": asdict(arch), "padded_vocab_size": 2048}
    (tmp_path / "megatron_ext.json").write_text(json.dumps(meta))
    start = ["--pretrained-checkpoint", str(tmp_path)]
    assert resolve_arch(load_config(None, start), 2000, None).arch == arch  # arch left out
    same = load_config(None, start)
    same.arch = {"preset": "tiny"}  # named (not the default), and the checkpoint's
    assert resolve_arch(same, 2000, None).arch == arch
    other = load_config(None, start)
    other.arch = {"preset": "tiny", "num_layers": 2}
    with pytest.raises(ConfigError, match=r"is not the config's arch: num_layers 4 \(config: 2\)"):
        resolve_arch(other, 2000, None)
    other.arch = {"preset": "tiny", "num_layer": 2}
    with pytest.raises(ConfigError, match=r"unknown field 'num_layer' \(did you mean num_layers"):
        resolve_arch(other, 2000, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU defaults")
def test_kernel_fusions_follow_what_can_run(tmp_path):
    """On a CPU: none by default; on request the compiled SwiGLU and, with our kernels, our RoPE
    and weight-gradient accumulation; with megatron-core's kernels those two need TE and apex."""
    from megatron_ext.training.model import kernel_fusions

    assert kernel_fusions(load_config(None, [])) == {
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "bias_activation_fusion": False,
    }
    flags = ["--bias-swiglu-fusion", "--apply-rope-fusion", "--gradient-accumulation-fusion"]
    # --kernels fused is the default: model/fusions.py provides the last two.
    assert set(kernel_fusions(load_config(None, flags)).values()) == {True}
    for overrides, needs in (
        (["--kernels", "megatron", "--apply-rope-fusion"], "Transformer Engine"),
        (["--kernels", "megatron", "--gradient-accumulation-fusion"], "fused_weight_gradient"),
    ):
        with pytest.raises(ConfigError, match=f"{overrides[-1]} needs .*{needs}"):
            kernel_fusions(load_config(None, overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU defaults")
def test_kernel_summary_names_what_the_run_uses():
    """The line a run starts with: the spec and why, our kernels or megatron-core's, fusions."""
    from megatron_ext.training.model import kernel_summary

    assert kernel_summary(load_config(None, [])) == (
        "layer spec: local (no GPU); kernels: ours (embedding, linear cross-entropy, "
        "PyTorch's fused attention); fusions: none"
    )
    summary = kernel_summary(
        load_config(
            None,
            ["--kernels", "megatron", "--transformer-impl", "local", "--bias-swiglu-fusion"],
        )
    )
    assert summary == (
        "layer spec: local (--transformer-impl local); kernels: megatron-core's; fusions: SwiGLU"
    )
    flags = ["--apply-rope-fusion", "--gradient-accumulation-fusion"]
    assert kernel_summary(load_config(None, flags)).endswith(
        "fusions: RoPE (kernels/rope.py), gradient accumulation (ours)"
    )
    with pytest.raises(ConfigError, match="--apply-rope-fusion needs"):
        kernel_summary(load_config(None, ["--kernels", "megatron", "--apply-rope-fusion"]))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {}),
        # Megatron-LM's shorthand, with megatron-core's default module.
        (
            ["--recompute-activations"],
            {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
        ),
        (
            ["--recompute-granularity", "selective", "--recompute-modules", "mlp", "core_attn"],
            {"recompute_granularity": "selective", "recompute_modules": ["mlp", "core_attn"]},
        ),
        (
            ["--recompute-granularity", "full"],
            {
                "recompute_granularity": "full",
                "recompute_method": "uniform",
                "recompute_num_layers": 1,
            },
        ),
        (
            ["--recompute-granularity", "full", "--recompute-method", "block"]
            + ["--recompute-num-layers", "3"],
            {
                "recompute_granularity": "full",
                "recompute_method": "block",
                "recompute_num_layers": 3,
            },
        ),
    ],
)
def test_recompute_settings_are_megatron_lms(argv, expected):
    config = load_config(None, [*REQUIRED, *argv])
    config.validate(1)
    assert config.recompute() == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--recompute-granularity", "some"], "--recompute-granularity must be one of full"),
        (
            ["--recompute-activations", "--recompute-granularity", "full"],
            "--recompute-activations is Megatron-LM's --recompute-granularity selective",
        ),
        (["--recompute-num-layers", "2"], "--recompute-num-layers need --recompute-granularity"),
        (
            ["--recompute-granularity", "selective", "--recompute-method", "block"],
            "--recompute-method is for --recompute-granularity full",
        ),
        (
            ["--recompute-granularity", "full", "--recompute-modules", "mlp"],
            "--recompute-modules is for --recompute-granularity selective",
        ),
        (
            ["--recompute-granularity", "selective", "--recompute-modules", "moe"],
            "--recompute-modules moe: choose from core_attn, mlp, layernorm",
        ),
        (
            ["--recompute-granularity", "full", "--recompute-method", "all"],
            "--recompute-method must be one of uniform, block",
        ),
        (
            ["--recompute-granularity", "full", "--recompute-num-layers", "0"],
            "--recompute-num-layers must be at least 1, got 0",
        ),
    ],
)
def test_recompute_mistakes_are_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*REQUIRED, *argv]).validate(1)


def test_a_last_stage_too_short_to_decay_says_what_train_iters_would_do(tmp_path):
    """tiny.yaml's second stage runs to --train-iters: 12 leave it 2, under its warm-up."""
    tiny = REPO / "examples" / "configs" / "tiny.yaml"
    config = load_config(tiny, [*REQUIRED, "--train-iters", "12"])
    with pytest.raises(ConfigError) as refused:
        config.validate(1)
    assert str(refused.value) == (
        "stage 'full': 5 warm-up iterations leave none of its 2 to decay (--train-iters 12 less "
        "the 10 of the stages before it): raise --train-iters to at least 16, or lower its "
        "lr_warmup_iters (or --lr-warmup-iters, which it inherits)"
    )
    load_config(tiny, [*REQUIRED, "--train-iters", "16"]).validate(1)
    stages = [{"name": "a", "train_iters": 3, "lr_warmup_iters": 3}, {"name": "b"}]
    explicit = dataclasses.replace(config, stages=[StageConfig(**stage) for stage in stages])
    with pytest.raises(ConfigError, match="'a': .* give it more train_iters, or lower its lr_w"):
        explicit.validate(1)
    # A last stage of given length must add up to --train-iters: both are raised together.
    stages = [{"name": "a", "train_iters": 10}, {"name": "b", "train_iters": 2}]
    explicit = dataclasses.replace(config, stages=[StageConfig(**stage) for stage in stages])
    with pytest.raises(ConfigError, match=r"raise --train-iters \(and its train_iters with it\)"):
        explicit.validate(1)
