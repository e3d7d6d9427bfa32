"""The set-up form without a browser: fields from the train dataclasses, form -> command line and
YAML -> form round trips, and bad input reported with the CLI's own message next to its field."""

from __future__ import annotations

from dataclasses import fields

import pytest

from lorafit.train.args import ARGUMENT_CLASSES, parse_train_args
from lorafit.train.config_file import config_sections
from lorafit.ui import checks, form
from lorafit.ui.form import EXTRA_ARGS, FormError, command_line, config_yaml, default_values, form_argv, values_from_yaml
from ui_helpers import cli_error


def declared_defaults() -> dict:
    return {f.name: f.default for cls in ARGUMENT_CLASSES for f in fields(cls)}


def test_every_field_has_the_name_default_and_help_of_lorafit_train():
    declared = {f.name: f for cls in ARGUMENT_CLASSES for f in fields(cls)}
    for field_ in form.FIELDS:
        assert field_.name in declared
        assert field_.default == declared[field_.name].default
        assert field_.help == declared[field_.name].metadata.get("help", "")
    kinds = {f.name: f.kind for f in form.FIELDS}
    assert kinds["train_file"] == "files" and kinds["lora_rank"] == "int" and kinds["packing"] == "bool"
    assert form.FIELDS_BY_NAME["data_format"].choices == ("auto", "prompt_response", "alpaca", "sharegpt", "messages")
    assert "cosine" in form.FIELDS_BY_NAME["lr_scheduler_type"].suggestions


def test_an_untouched_form_is_a_bare_command_and_the_train_defaults():
    values = default_values()
    assert form_argv(values) == []
    assert command_line([]) == "lorafit train"
    assert config_sections(checks.parse_form(values)[1]) == config_sections(parse_train_args([]))


def filled(**changes) -> dict:
    return {**default_values(), **changes}


ROUND_TRIPS = [
    filled(train_file="a.jsonl", lora_rank="16", learning_rate="1e-4", output_dir="out/x"),
    filled(train_file="a.jsonl,b.jsonl", packing="true", use_rslora="true", data_format="alpaca",
           target_modules="q_proj,v_proj", max_steps="20", warmup_steps="5"),
    filled(train_file="a.jsonl", cutoff_len="", num_train_epochs="1",
           **{EXTRA_ARGS: "--validation_split_percentage 10 --max_train_samples 8 --report_to none"}),
]


@pytest.mark.parametrize("values", ROUND_TRIPS)
def test_form_command_line_and_yaml_are_the_same_run(values, tmp_path):
    argv, config = checks.parse_form(values)
    assert config_sections(config) == config_sections(parse_train_args(argv))
    saved = tmp_path / "run.yaml"
    saved.write_text(config_yaml(config), encoding="utf-8")
    from_file = parse_train_args([str(saved)])
    assert config_sections(from_file) == config_sections(config)
    loaded = values_from_yaml(saved.read_text(encoding="utf-8"))  # and back into the form
    assert config_sections(checks.parse_form(loaded)[1]) == config_sections(config)


def test_a_value_written_differently_from_its_default_is_still_the_default():
    assert form_argv(filled(learning_rate="2e-4", lora_alpha="32", use_rslora="false")) == []


def test_a_runs_own_lorafit_config_yaml_loads_into_the_form(tmp_path):
    from lorafit.train.config_file import write_config_yaml

    config = parse_train_args(["--train_file", "a.jsonl", "--lora_rank", "4", "--max_train_samples", "3"])
    path = write_config_yaml(config, tmp_path / "lorafit_config.yaml")
    values = values_from_yaml(path.read_text())
    assert values["lora_rank"] == "4" and values["train_file"] == "a.jsonl"
    assert values[EXTRA_ARGS] == "--max_train_samples 3"  # not a form field; the defaults are left out
    assert config_sections(checks.parse_form(values)[1]) == config_sections(config)


def test_an_unknown_name_in_a_yaml_file_is_refused_with_the_cli_suggestion():
    with pytest.raises(FormError) as refused:
        values_from_yaml("lora_rnak: 4\n")
    assert refused.value.errors == {"config": "unknown argument 'lora_rnak' in the YAML file; did you mean --lora_rank?"}


@pytest.mark.parametrize(("changes", "field_name"), [
    ({"lora_rank": "abc"}, "lora_rank"),
    ({"lora_rank": "0"}, "lora_rank"),
    ({"lora_dropout": "1.5"}, "lora_dropout"),
    ({"data_format": "csv"}, "data_format"),
    ({"validation_split_percentage": "100"}, "validation_split_percentage"),
    ({"learning_rate": "fast"}, "learning_rate"),
    ({EXTRA_ARGS: "--learning_rat 1"}, EXTRA_ARGS),
    ({EXTRA_ARGS: "--do_eval"}, EXTRA_ARGS),
])
def test_a_bad_value_is_shown_next_to_its_field_with_the_cli_message(changes, field_name):
    values = filled(train_file="a.jsonl", **changes)
    with pytest.raises(FormError) as refused:
        checks.parse_form(values)
    assert list(refused.value.errors) == [field_name]
    assert refused.value.errors[field_name] == cli_error(*form_argv(values))


def test_an_unclosed_quote_in_the_other_arguments_is_named():
    with pytest.raises(FormError) as refused:
        form_argv(filled(**{EXTRA_ARGS: "--run_name 'oops"}))
    assert list(refused.value.errors) == [EXTRA_ARGS]


@pytest.mark.parametrize(("message", "field_name"), [
    ("--train_file x.jsonl: no such file, folder or glob match", "train_file"),
    ("--validation_file v.jsonl: no such file, folder or glob match", EXTRA_ARGS),
    ("--template 'x': not a known template and not a file; expected one of auto, default", "template"),
    ("model folder /nope does not exist", "form"),
])
def test_messages_go_to_the_field_they_name(message, field_name):
    assert checks.field_for(message) == field_name
