"""`lorafit chat`: scripted through stdin, one streamed answer per line, prompts rendered by the training template."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import lorafit
from lorafit.data.render import render_prompt
from lorafit.data.templates import set_chat_template
from lorafit.infer.chat import ChatSession, run_repl
from lorafit.infer.loading import load_for_inference
from lorafit.infer.options import GenerationOptions
from lorafit.models import load_model, load_tokenizer

GREEDY = GenerationOptions(temperature=0, max_new_tokens=6)
PROMPT_START, PROMPT_END = "----- prompt -----\n", "\n----- end of prompt -----\n"


def shown_prompts(stderr: str) -> list[str]:
    return [part.split(PROMPT_END)[0] for part in stderr.split(PROMPT_START)[1:]]


def expected_answers(model_dir, system, turns):
    """What the chat should answer, computed in-process with the same greedy settings."""
    session = ChatSession(load_for_inference(model_dir), GREEDY, system=system)
    answers = []
    for turn in turns:
        if turn == "/reset":
            session.reset()
            continue
        answers.append(session.reply(turn, lambda _text: None).text)
    return answers


def test_scripted_chat_streams_one_answer_per_line_with_the_training_template(tiny_model_dir):
    turns = ["Hello there", "What is 2+2?", "/reset", "Bye"]
    system = "Be brief."
    answers = expected_answers(tiny_model_dir, system, turns)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    run = subprocess.run(
        [sys.executable, "-m", "lorafit", "chat", "--model_name_or_path", tiny_model_dir, "--system", system,
         "--temperature", "0", "--max_new_tokens", "6", "--show_prompt"],
        input="\n".join(turns + ["/exit", "never answered"]) + "\n", capture_output=True, text=True,
        env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "".join(answer + "\n" for answer in answers)

    tokenizer = load_tokenizer(tiny_model_dir)
    sys_msg = {"role": "system", "content": system}
    first = [sys_msg, {"role": "user", "content": "Hello there"}]
    second = first + [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": "What is 2+2?"}]
    after_reset = [sys_msg, {"role": "user", "content": "Bye"}]
    expected = [tokenizer.decode(render_prompt(tokenizer, m), skip_special_tokens=False)
                for m in (first, second, after_reset)]
    assert shown_prompts(run.stderr) == expected
    assert expected[0].startswith("<|im_start|>system\nBe brief.<|im_end|>")  # the ChatML training template
    assert expected[1].endswith("<|im_start|>assistant\n")


def test_adapter_tokenizer_template_is_used(tiny_model_dir, tmp_path):
    """An adapter saved with its training tokenizer (here the alpaca template) chats in that template."""
    model = load_model(tiny_model_dir)
    lorafit.add_lora(model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    lorafit.save_adapter(model, adapter, base_model_name_or_path=tiny_model_dir)
    set_chat_template(load_tokenizer(tiny_model_dir), "alpaca").save_pretrained(adapter)

    loaded = load_for_inference(adapter=str(adapter))  # the base comes from adapter_config.json
    prompts = []
    session = ChatSession(loaded, GREEDY, show_prompt=prompts.append)
    out, err = io.StringIO(), io.StringIO()
    run_repl(session, ["Name a colour.\n", "/exit\n"], out, err, interactive=False)
    assert len(prompts) == 1 and "### Instruction:\nName a colour.\n\n### Response:\n" in prompts[0]
    assert out.getvalue().count("\n") >= 1
    assert loaded.tokenizer.eos_token_id in loaded.stop_token_ids


def test_history_drops_oldest_exchange_when_context_is_full(tiny_model_dir):
    loaded = load_for_inference(tiny_model_dir)
    limit = loaded.model.config.max_position_embeddings
    session = ChatSession(loaded, GenerationOptions(temperature=0, max_new_tokens=4))
    long_text = "word " * (limit // 2 - 10)  # two of these overflow the context, one fits
    session.messages = [{"role": "user", "content": long_text}, {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": long_text}, {"role": "assistant", "content": "ok"}]
    session.reply("short question", lambda _t: None)
    assert [m["role"] for m in session.messages][-2:] == ["user", "assistant"]
    assert len(session.messages) == 4  # the oldest exchange went, the newer one stayed
    assert session.messages[0]["content"] == long_text and session.messages[2]["content"] == "short question"


def test_a_template_that_refuses_the_conversation_is_reported_and_the_chat_goes_on(tiny_model_dir):
    loaded = load_for_inference(tiny_model_dir)
    loaded.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    session = ChatSession(loaded, GREEDY, system="Be brief.")
    out, err = io.StringIO(), io.StringIO()
    run_repl(session, ["Hello", "/reset", "Hi again"], out, err, interactive=False)
    assert err.getvalue().count("System role not supported") == 2
    session.system = None  # without the system prompt the same template works
    session.reset()
    run_repl(session, ["Hello"], out, err, interactive=False)
    assert len(session.messages) == 2 and session.messages[1]["role"] == "assistant"
