"""Continuous batching: rows that join and leave a running batch answer as they would alone."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from lorafit.data.render import render_prompt
from lorafit.infer.engine import BatchingEngine
from lorafit.infer.generate import generate
from lorafit.infer.loading import load_for_inference
from lorafit.infer.options import GenerationOptions

GREEDY = GenerationOptions(temperature=0, max_new_tokens=24)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_for_inference(tiny_model_dir)


def prompt_of(loaded, text):
    return render_prompt(loaded.tokenizer, [{"role": "user", "content": text}])


def alone(loaded, prompt, options, stop_token_ids=()):
    (completion,) = generate(loaded.model, [prompt], options, stop_token_ids=stop_token_ids,
                             pad_token_id=loaded.tokenizer.pad_token_id, tokenizer=loaded.tokenizer)
    return completion


def engine_for(loaded, max_batch_size, stop_token_ids=()):
    return BatchingEngine(loaded.model, loaded.tokenizer, stop_token_ids=stop_token_ids,
                          pad_token_id=loaded.tokenizer.pad_token_id, max_batch_size=max_batch_size)


def test_rows_joining_and_leaving_at_different_steps_equal_their_solo_answers(loaded):
    texts = ["Hi", "Tell me a long story about the sea and the wind and the birds, please.", "What is two plus two?",
             "Name three colours.", "Why is the sky blue? Explain it to a child.", "Ok thanks"]
    prompts = [prompt_of(loaded, text) for text in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # every prompt length differs
    options = [GREEDY.updated(max_new_tokens=n) for n in (24, 9, 17, 3, 24, 12)]
    free = alone(loaded, prompts[4], options[4])
    options[4] = options[4].updated(stop=[free.text[5:8]])  # a stop string mid-answer
    expected = [alone(loaded, p, o) for p, o in zip(prompts, options)]
    assert expected[4].finish_reason == "stop" and expected[4].text == free.text[:free.text.index(free.text[5:8])]

    engine = engine_for(loaded, max_batch_size=3)  # six requests, three rows: some wait for room
    streamed = [[] for _ in prompts]
    requests = []
    seen_running = []
    for index, (prompt, option) in enumerate(zip(prompts, options)):
        requests.append(engine.submit(prompt, option, on_text=streamed[index].append))
        for _ in range(index % 3 + 1):  # newcomers arrive while others are mid-answer
            engine.step()
            seen_running.append(engine.running)
    engine.run_until_idle()

    for request, want, pieces in zip(requests, expected, streamed):
        got = request.done.result()
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        assert got.completion_tokens == want.completion_tokens and "".join(pieces) == got.text
    assert max(seen_running) == 3  # the batch was full at times ...
    assert engine.running == 0 and engine.idle  # ... and everyone left


def test_stop_tokens_and_end_of_turn_per_request(loaded):
    prompt = prompt_of(loaded, "Count to ten.")
    free = alone(loaded, prompt, GREEDY)
    stop = free.token_ids[4]
    engine = engine_for(loaded, max_batch_size=4, stop_token_ids=[stop])
    stopping = engine.submit(prompt, GREEDY)
    running_on = engine.submit(prompt, GREEDY, stop_token_ids=())  # as with ignore_eos: nothing stops it
    engine.run_until_idle()
    stopped = stopping.done.result()
    assert stopped.token_ids == free.token_ids[:free.token_ids.index(stop)] and stopped.finish_reason == "stop"
    assert running_on.done.result().token_ids == free.token_ids


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(loaded):
    sampled = GenerationOptions(temperature=1.3, top_k=40, top_p=0.95, repetition_penalty=1.2, max_new_tokens=20,
                                seed=1234)
    prompt = prompt_of(loaded, "Surprise me.")
    solo = alone(loaded, prompt, sampled)
    engine = engine_for(loaded, max_batch_size=4)
    neighbours = [engine.submit(prompt_of(loaded, text), GREEDY.updated(repetition_penalty=1.5))
                  for text in ("a", "a longer neighbour prompt")]
    engine.step()
    engine.step()
    joined = engine.submit(prompt, sampled)  # joins mid-flight, beside greedy rows with their own penalty
    other_seed = engine.submit(prompt, sampled.updated(seed=99))
    engine.run_until_idle()
    assert joined.done.result().token_ids == solo.token_ids
    assert other_seed.done.result().token_ids != solo.token_ids
    for request, text in zip(neighbours, ("a", "a longer neighbour prompt")):
        want = alone(loaded, prompt_of(loaded, text), GREEDY.updated(repetition_penalty=1.5))
        assert request.done.result().token_ids == want.token_ids


def test_cancelled_rows_leave_and_the_others_finish(loaded):
    engine = engine_for(loaded, max_batch_size=2)
    prompts = [prompt_of(loaded, text) for text in ("one", "two two", "three three three")]
    leaving = engine.submit(prompts[0], GREEDY)
    staying = engine.submit(prompts[1], GREEDY)
    never_started = engine.submit(prompts[2], GREEDY)  # waits: the batch is full
    engine.step()
    leaving.cancel()
    never_started.cancel()
    engine.step()
    assert engine.running == 1  # gone at once, not at the end of its answer
    engine.run_until_idle()
    assert leaving.done.result().finish_reason == "cancelled" and leaving.done.result().completion_tokens == 2
    assert never_started.done.result() is None
    assert staying.done.result().token_ids == alone(loaded, prompts[1], GREEDY).token_ids


def test_a_failing_step_fails_its_rows_and_the_engine_goes_on(loaded, monkeypatch):
    from lorafit.infer import decode_batch

    engine = engine_for(loaded, max_batch_size=2)
    prompt = prompt_of(loaded, "hi")
    broken = engine.submit(prompt, GREEDY)
    original = decode_batch.DecodeBatch.step
    monkeypatch.setattr(decode_batch.DecodeBatch, "step", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.step()
    with pytest.raises(RuntimeError, match="boom"):
        broken.done.result()
    monkeypatch.setattr(decode_batch.DecodeBatch, "step", original)
    fine = engine.submit(prompt, GREEDY)
    engine.run_until_idle()
    assert fine.done.result().token_ids == alone(loaded, prompt, GREEDY).token_ids


def test_an_exception_in_on_text_reaches_the_caller(loaded):
    def broken_pipe(_row, _text):
        raise BrokenPipeError("stdout closed")

    with pytest.raises(BrokenPipeError):
        generate(loaded.model, [prompt_of(loaded, "hi")], GREEDY, tokenizer=loaded.tokenizer, on_text=broken_pipe)


def test_a_cache_that_cannot_be_spliced_admits_only_into_an_empty_batch():
    """Sliding-window layers keep only the last few keys: such rows cannot be left-padded into a batch."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=6)
    model = MistralForCausalLM(config).eval()
    prompts = [[5, 17, 42, 9, 3, 77, 21], [8, 1, 60], [100, 2, 33, 4, 90]]
    options = [GREEDY.updated(max_new_tokens=n) for n in (12, 5, 8)]
    engine = BatchingEngine(model, max_batch_size=3)
    first = [engine.submit(p, o) for p, o in zip(prompts[:2], options[:2])]
    engine.step()
    late = engine.submit(prompts[2], options[2])
    engine.step()
    assert engine.running == 2  # the newcomer waits for the batch to empty
    engine.run_until_idle()
    for request, prompt, option in zip(first + [late], prompts, options):
        assert request.done.result().token_ids == generate(model, [prompt], option)[0].token_ids


def test_submit_refuses_what_it_cannot_do(loaded):
    engine = engine_for(loaded, max_batch_size=2)
    with pytest.raises(Exception, match="holds no named adapters"):
        engine.submit([1, 2], GREEDY, adapter_id="other")
    with pytest.raises(Exception, match="at least one token"):
        engine.submit([], GREEDY)
    with pytest.raises(Exception, match="--max_batch_size"):
        engine_for(loaded, max_batch_size=0)
