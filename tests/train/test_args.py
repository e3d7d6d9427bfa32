"""`lorafit train` arguments: YAML plus flags, misspellings, recipe flags, LoRA defaults, round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from lorafit.errors import UserError
from lorafit.train.args import ArgumentsError, parse_train_args, split_module_list
from lorafit.train.config_file import write_config_yaml


def test_lora_friendly_defaults_when_nothing_is_given():
    config = parse_train_args(["--train_file", "data.jsonl"])
    training = config.training
    assert training.learning_rate == 2e-4
    assert training.lr_scheduler_type == "cosine"
    assert 0 < training.warmup_steps < 1  # a fraction of the run
    assert training.logging_steps < 1 and training.logging_first_step  # a curve even on small data
    assert training.report_to in ("none", [], ["none"])
    assert training.remove_unused_columns is False
    assert config.model.model_name_or_path == "smollm2-135m-instruct"
    assert config.model.trust_remote_code is False
    lora = config.lora
    assert (lora.use_peft, lora.lora_impl, lora.lora_rank) == (True, "native", 8)
    assert (lora.lora_alpha, lora.lora_dropout) == (32, 0.05)
    assert lora.target_modules == "all-linear"


def test_yaml_file_then_flags_override_it(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("learning_rate: 1e-4\nlora_rank: 16\nnum_train_epochs: 2\ntrain_file: [a.jsonl]\n")
    config = parse_train_args([str(config_file), "--lora_rank", "4"])
    assert config.training.learning_rate == 1e-4  # YAML's "1e-4" is a string: argparse types it
    assert config.training.num_train_epochs == 2
    assert config.lora.lora_rank == 4  # the flag wins
    assert config.data.train_file == ["a.jsonl"]
    assert {"learning_rate", "lora_rank", "num_train_epochs", "train_file"} <= config.explicit


@pytest.mark.parametrize("argv, suggestion", [
    (["--learning_rat", "1e-4"], "--learning_rate"),
    (["--lora_rnak", "4"], "--lora_rank"),
    (["--num_train_epoch=2"], "--num_train_epochs"),
    (["--target_module", "q_proj"], "--target_modules"),  # no silent prefix match either
])
def test_misspelled_flag_suggests_the_closest_name(argv, suggestion):
    with pytest.raises(UserError, match=f"did you mean {suggestion}\\?"):
        parse_train_args(argv)


def test_misspelled_yaml_key_names_the_file_and_suggests(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("lerning_rate: 1e-4\n")
    with pytest.raises(UserError, match=r"'lerning_rate' in .*run.yaml; did you mean --learning_rate"):
        parse_train_args([str(config_file)])


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "fast"], "invalid float value"),
    (["--lora_impl", "mine"], "invalid choice"),
    (["--lora_rank", "0"], "positive integer"),
    (["--use_peft", "false", "--peft_path", "x"], "--use_peft false"),
    (["--peft_path", "/nonexistent"], "not an adapter folder"),
    (["--do_eval"], "needs evaluation data"),
    (["--streaming"], "--max_steps"),
    (["notes.txt"], "unexpected value"),
    (["--adapter_scale", "0"], "--adapter_scale must be positive"),
    (["--adapter_scale", "0.7", "--use_dora"], "cannot be combined with --use_dora"),
    (["--adapter_scale", "0.7", "--init_lora_weights", "pissa"], "--init_lora_weights pissa"),
    (["--adapter_scale", "0.7", "--lora_impl", "peft"], "--lora_impl peft"),
    (["--replay_prompts", "builtin", "--replay_rotation", "true", "--replay_ratio", "0"], "--replay_ratio must be positive"),
    (["--replay_prompts", "builtin", "--replay_ratio", "1.2"], "it needs --replay_rotation true"),
])
def test_bad_values_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_train_args(argv)


def test_cli_reports_a_misspelling_without_traceback():
    result = subprocess.run([sys.executable, "-m", "lorafit", "train", "--lora_rnak", "4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "did you mean --lora_rank?" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_clm_recipe_arguments_are_accepted(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    config = parse_train_args([
        "--train_file", "a.json", "--max_source_length", "256", "--max_target_length", "64",
        "--prompt_type", "standard_alpaca", "--peft_path", str(adapter), "--ignore_pad_token_for_loss", "true",
        "--overwrite_cache", "--preprocessing_num_workers", "2", "--lora_rank", "8", "--lora_alpha", "32",
        "--lora_dropout", "0.05", "--modules_to_save", "embed_tokens,lm_head", "--torch_dtype", "float32",
        "--warmup_ratio", "0.05", "--evaluation_strategy", "no", "--trainable", "q_proj,v_proj",
        "--overwrite_output_dir", "--ddp_timeout", "30000", "--gradient_checkpointing",
    ])
    data = config.data
    assert (data.max_source_length, data.max_target_length, data.template_choice) == (256, 64, "alpaca")
    assert data.overwrite_cache and data.preprocessing_num_workers == 2 and data.ignore_pad_token_for_loss
    assert config.lora.peft_path == str(adapter)
    assert split_module_list(config.lora.modules_to_save) == ["embed_tokens", "lm_head"]
    assert split_module_list(config.lora.target_modules) == ["q_proj", "v_proj"]  # --trainable
    assert config.training.warmup_steps == 0.05  # --warmup_ratio
    assert config.training.overwrite_output_dir and config.training.activation_checkpointing


@pytest.mark.parametrize("flags, expected", [
    (["--group_by_length"], "group_by_length"),
    (["--group_by_length", "--seed", "3"], "group_by_length"),
    (["--group_by_length", "false"], "random"),
    (["--group_by_length=True"], "group_by_length"),
    ([], "random"),
])
def test_group_by_length_is_transformers_5s_sampling_strategy(flags, expected):
    config = parse_train_args(["--train_file", "a.json", *flags])
    assert config.training.train_sampling_strategy == expected


def test_group_by_length_in_a_file_and_a_bad_value(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train_file: a.json\ngroup_by_length: true\n")
    assert parse_train_args([str(recipe)]).training.train_sampling_strategy == "group_by_length"
    with pytest.raises(ArgumentsError, match="group_by_length: expected true or false, got 'sometimes'"):
        parse_train_args(["--train_file", "a.json", "--group_by_length=sometimes"])


def test_module_lists_regexes_and_all_linear():
    assert split_module_list("all-linear") == "all-linear"
    assert split_module_list("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert split_module_list(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    assert split_module_list(None) is None


def test_evaluation_is_switched_on_by_evaluation_data():
    config = parse_train_args(["--train_file", "a.jsonl", "--validation_split_percentage", "10"])
    assert config.training.eval_strategy == "steps"
    assert config.training.eval_steps == config.training.save_steps
    explicit = parse_train_args(["--train_file", "a.jsonl", "--validation_file", "b.jsonl", "--eval_strategy", "no"])
    assert explicit.training.eval_strategy == "no"


def test_written_config_reruns_to_the_same_arguments(tmp_path):
    original = parse_train_args(["--train_file", "a.jsonl", "--learning_rate", "3e-4", "--lora_rank", "4",
                                 "--target_modules", "q_proj,v_proj", "--gradient_accumulation_steps", "2",
                                 "--cutoff_len", "512", "--use_rslora"])
    path = write_config_yaml(original, tmp_path / "lorafit_config.yaml", header="test")
    written = yaml.safe_load(path.read_text())
    assert "hub_token" not in written and "use_cpu" not in written  # no secrets, no machine choices
    rerun = parse_train_args([str(path)])
    for section in ("model", "data", "lora"):
        assert getattr(rerun, section) == getattr(original, section)
    for name in ("learning_rate", "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps",
                 "logging_steps", "num_train_epochs", "output_dir", "seed"):
        assert getattr(rerun.training, name) == getattr(original.training, name), name


def test_file_flags_on_the_command_line_replace_the_files_lists(tmp_path):
    """--train_file repeats (extend); given on the command line it replaces the YAML's list, never adds to it."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text("train_file: [a.jsonl]\nvalidation_file: v.jsonl\noutput_dir: out\n")
    config = parse_train_args([str(config_file), "--train_file", "b.jsonl", "--train_file", "c.jsonl"])
    assert config.data.train_file == ["b.jsonl", "c.jsonl"] and config.data.validation_file == ["v.jsonl"]
    assert parse_train_args([str(config_file)]).data.train_file == ["a.jsonl"]


def test_config_file_values_are_checked_against_the_flags_choices(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("lora_impl: pef\n")
    with pytest.raises(UserError, match="lora_impl: 'pef' is not one of native, peft"):
        parse_train_args([str(config_file)])
