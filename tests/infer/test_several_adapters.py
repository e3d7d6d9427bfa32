"""Several adapters on one base: in one server, requests for different adapters share one running
batch and each gets the greedy answer that adapter gives served alone (`lorafit serve --adapter DIR`);
chat and generate answer with each adapter side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import lorafit
from lorafit.data.render import render_prompt
from lorafit.data.templates import set_chat_template
from lorafit.errors import UserError
from lorafit.infer.engine import BatchingEngine
from lorafit.infer.loading import load_for_inference, load_with_adapters, parse_adapter_flags
from lorafit.infer.options import GenerationOptions
from lorafit.infer.serve import ServedModel, create_app
from server_helpers import running_app

GREEDY = GenerationOptions(temperature=0, max_new_tokens=12)
QUESTIONS = ["Hi there", "What is two plus two?", "Name a colour.", "Tell me about the sea and the wind."]


def make_adapter(folder, base_dir, config, seed, tokenizer=None):
    model = lorafit.models.load_model(base_dir)
    lorafit.add_lora(model, lorafit.LoraConfig(init_lora_weights=False, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large enough to change the greedy answers
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    lorafit.save_adapter(model, folder, base_model_name_or_path=str(base_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("adapters")
    alpaca = set_chat_template(lorafit.models.load_tokenizer(tiny_model_dir), "alpaca")  # its own template
    return {
        "alpha": make_adapter(root / "alpha", tiny_model_dir, {"target_modules": "all-linear", "r": 4}, 1),
        "beta": make_adapter(root / "beta", tiny_model_dir, {"target_modules": ["q_proj", "v_proj"], "r": 8}, 2,
                             tokenizer=alpaca),
    }


@pytest.fixture(scope="module")
def multi(tiny_model_dir, adapters):
    return load_with_adapters(tiny_model_dir, adapters)


def solo_answers(model_dir, adapter, questions):
    """What `lorafit serve --adapter DIR` (merged) or the bare base answers, one request at a time."""
    loaded = load_for_inference(model_dir, adapter)
    answers = []
    for question in questions:
        engine = BatchingEngine(loaded.model, loaded.tokenizer, stop_token_ids=loaded.stop_token_ids,
                                pad_token_id=loaded.tokenizer.pad_token_id, max_batch_size=1)
        request = engine.submit(render_prompt(loaded.tokenizer, [{"role": "user", "content": question}]), GREEDY)
        engine.run_until_idle()
        answers.append(request.done.result().text)
    return answers


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapters):
    answers = {name: solo_answers(tiny_model_dir, path, QUESTIONS) for name, path in adapters.items()}
    answers["base"] = solo_answers(tiny_model_dir, None, QUESTIONS)
    assert len({tuple(a) for a in answers.values()}) == 3  # the adapters really answer differently
    return answers


def test_a_mixed_batch_equals_each_adapter_served_alone(multi, expected):
    served_by = {a.name: a for a in multi.answerers}
    base_name = multi.answerers[0].name
    engine = BatchingEngine(multi.model, multi.tokenizer, stop_token_ids=multi.stop_token_ids,
                            pad_token_id=multi.tokenizer.pad_token_id, max_batch_size=12)
    jobs = {}
    for name in ("alpha", "beta", "base"):
        answerer = served_by[base_name if name == "base" else name]
        for index, question in enumerate(QUESTIONS):
            prompt = render_prompt(answerer.tokenizer, [{"role": "user", "content": question}])
            jobs[name, index] = engine.submit(prompt, GREEDY, stop_token_ids=answerer.stop_token_ids,
                                              adapter_id=answerer.adapter_id)
    engine.step()
    assert engine.running == 12  # one batch, three adapters (base included)
    engine.run_until_idle()
    for (name, index), job in jobs.items():
        assert job.done.result().text == expected[name][index], (name, QUESTIONS[index])


def test_the_server_lists_every_adapter_and_answers_each_by_its_model_field(multi, expected):
    served = ServedModel(multi, GenerationOptions(max_new_tokens=12), max_batch_size=8)
    try:
        with running_app(create_app(served, "base-model")) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
            assert [m.id for m in client.models.list().data] == ["base-model", "alpha", "beta"]

            def ask(model, question):
                reply = client.chat.completions.create(model=model, temperature=0, max_tokens=12,
                                                       messages=[{"role": "user", "content": question}])
                return reply.model, reply.choices[0].message.content

            asks = [(model, q) for q in QUESTIONS for model in ("alpha", "beta", "base-model")]
            with ThreadPoolExecutor(len(asks)) as pool:  # concurrent: they share running batches
                replies = list(pool.map(lambda a: ask(*a), asks))
            for (model, question), (answered_by, text) in zip(asks, replies):
                name = "base" if model == "base-model" else model
                assert answered_by == model and text == expected[name][QUESTIONS.index(question)]

            stream = client.chat.completions.create(model="beta", temperature=0, max_tokens=12, stream=True,
                                                    messages=[{"role": "user", "content": QUESTIONS[1]}])
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected["beta"][1]
            with pytest.raises(openai.NotFoundError, match="`base-model`, `alpha`, `beta`"):
                ask("gamma", "Hi")
    finally:
        served.close()


def test_adapter_flags_name_each_adapter_and_refuse_clashes(adapters, tmp_path):
    assert parse_adapter_flags([str(adapters["alpha"])]) == adapters["alpha"]  # one bare DIR: merged, as before
    assert parse_adapter_flags([f"a={adapters['alpha']}", str(adapters["beta"])]) == {
        "a": adapters["alpha"], "beta": adapters["beta"]}
    with pytest.raises(UserError, match="two adapters are named 'x'"):
        parse_adapter_flags([f"x={adapters['alpha']}", f"x={adapters['beta']}"])
    with pytest.raises(UserError, match="expected NAME=DIR"):
        parse_adapter_flags([f"={adapters['alpha']}", str(adapters["beta"])])
    with pytest.raises(UserError, match="no such folder"):
        parse_adapter_flags([f"x={tmp_path / 'missing'}", str(adapters["beta"])])


def test_serve_cli_with_two_adapters_refuses_a_name_clash_with_the_base(multi):
    served = ServedModel(multi, GenerationOptions(max_new_tokens=4), max_batch_size=2)
    try:
        with pytest.raises(UserError, match="two served models would be called 'alpha'"):
            create_app(served, "alpha")
    finally:
        served.close()


def test_generate_answers_each_record_with_every_adapter_side_by_side(tiny_model_dir, adapters, expected, tmp_path):
    from lorafit import cli

    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"prompt": q, "id": i}) + "\n" for i, q in enumerate(QUESTIONS)))
    code = cli.main(["generate", "--model_name_or_path", tiny_model_dir, "--input", str(source), "--output",
                     str(output), "--adapter", f"alpha={adapters['alpha']}", "--adapter", f"beta={adapters['beta']}",
                     "--batch_size", "3", "--temperature", "0", "--max_new_tokens", "12"])
    assert code == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["id"] for row in rows] == list(range(len(QUESTIONS))) and "response" not in rows[0]
    for index, row in enumerate(rows):
        assert row["responses"] == {"alpha": expected["alpha"][index], "beta": expected["beta"][index]}


def test_chat_answers_every_message_with_each_adapter(tiny_model_dir, adapters, expected):
    run = subprocess.run(
        [sys.executable, "-m", "lorafit", "chat", "--model_name_or_path", tiny_model_dir,
         "--adapter", f"alpha={adapters['alpha']}", "--adapter", str(adapters["beta"]),
         "--temperature", "0", "--max_new_tokens", "12"],
        input=f"{QUESTIONS[0]}\n{QUESTIONS[1]}\n", capture_output=True, text=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[:2] == [f"[alpha] {expected['alpha'][0]}", f"[beta] {expected['beta'][0]}"]
    assert len(lines) == 4 and lines[2].startswith("[alpha] ") and lines[3].startswith("[beta] ")


def test_merge_combines_adapters_into_one_adapter_or_one_model(tiny_model_dir, adapters, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorafit import cli
    from lorafit.lora.weighted import combine_adapters

    pair = ["--adapter", str(adapters["alpha"]), "--adapter", str(adapters["beta"]), "--adapter_weights", "0.5", "-1"]
    assert cli.main(["merge", *pair, "--adapter_only", "--output_dir", str(tmp_path / "ab")]) == 0
    assert (tmp_path / "ab" / "adapter_model.safetensors").is_file()
    assert "### Instruction" in (tmp_path / "ab" / "tokenizer_config.json").read_text() + "".join(
        p.read_text() for p in (tmp_path / "ab").glob("chat_template*"))  # beta's tokenizer, the one saved
    combined = lorafit.load_adapter(lorafit.models.load_model(tiny_model_dir), tmp_path / "ab").eval()
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = combined(input_ids=ids).logits

    _config, tensors = combine_adapters([adapters["alpha"], adapters["beta"]], [0.5, -1.0], "cat")
    assert tensors.keys() == lorafit.lora.adapter_io.read_adapter_tensors(tmp_path / "ab").keys()

    assert cli.main(["merge", *pair, "--output_dir", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference, atol=1e-4, rtol=1e-4)

    assert cli.main(["merge", *pair[:4], "--adapter_weights", "1", "--adapter_only",
                     "--output_dir", str(tmp_path / "bad")]) == 2
    assert "--adapter_weights has 1 values for 2 adapters" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
