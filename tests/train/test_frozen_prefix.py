"""The frozen-prefix cache: later passes over the same examples start at the lowest trained block,
with the loss and gradients of the whole forward pass."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

import lorafit
from lorafit.data.collate import PaddingCollator
from lorafit.train.attention import use_training_attention
from lorafit.train.frozen_prefix import enable_frozen_prefix_cache, first_trained_block, why_not
from lorafit.train.run import main as train_main
from lorafit.train.trained_token_loss import use_trained_token_loss
from model_builders import build_tiny_llama, build_tiny_qwen2

PREFIX = [7, 3, 9, 11, 4, 8]  # every example begins with it, untrained: a system prompt


def features(seed: int, count: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in torch.randint(3, 12, (count,), generator=generator).tolist():
        ids = PREFIX + torch.randint(12, 128, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (len(PREFIX) + 1) + ids[len(PREFIX) + 1:]})
    return rows


def top_block_model(builder, layers: int = 3):
    model = builder(num_hidden_layers=layers)
    model.config._attn_implementation = "sdpa"
    model.config.use_cache = False
    lorafit.add_lora(model, lorafit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                               lora_dropout=0.0, layers_to_transform=[layers - 1]))
    use_training_attention(model)
    assert use_trained_token_loss(model)
    return model.train()


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


ARGS = SimpleNamespace(frozen_prefix_cache_gb=1.0, neftune_noise_alpha=None, gradient_checkpointing=False,
                       deepspeed=None, fsdp=None)


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2])
def test_batches_from_kept_states_have_the_loss_and_gradients_of_the_whole_pass(builder):
    model = top_block_model(builder)
    data = features(1, 8)
    first_epoch = [PaddingCollator(0)(data[:4]), PaddingCollator(0)(data[4:])]
    expected = [loss_and_grads(model, batch) for batch in first_epoch]  # no cache yet
    assert enable_frozen_prefix_cache(model, ARGS, tokens=1000)
    cache = model._lorafit_prefix_cache
    assert cache.first == 2
    for batch in first_epoch:  # the first pass keeps the states...
        loss_and_grads(model, batch)
    assert (cache.hits, cache.misses, len(cache.states)) == (0, 2, 8)
    shuffled = random.Random(0).sample(data, len(data))  # ...later epochs mix the examples differently
    for batch in (PaddingCollator(0)(shuffled[:4]), PaddingCollator(0)(shuffled[4:])):
        cache_loss, cache_grads = loss_and_grads(model, batch)
        model._lorafit_prefix_cache = None
        full_loss, full_grads = loss_and_grads(model, batch)
        model._lorafit_prefix_cache = cache
        assert abs(cache_loss - full_loss) <= 1e-5
        for grad, full in zip(cache_grads, full_grads, strict=True):
            assert ((grad - full).norm() / full.norm()) <= 1e-5
    assert cache.hits == 2
    # and a kept pass of the first batches gives what the whole pass gave then
    for batch, (loss, grads) in zip(first_epoch, expected):
        cache_loss, cache_grads = loss_and_grads(model, batch)
        assert abs(cache_loss - loss) <= 1e-5
    model.eval()  # evaluation takes the whole pass
    with torch.no_grad():
        model(**first_epoch[0])
    assert cache.hits == 4


def test_a_batch_of_new_examples_takes_the_whole_pass_and_keeps_them():
    model = top_block_model(build_tiny_llama)
    assert enable_frozen_prefix_cache(model, ARGS, tokens=1000)
    cache = model._lorafit_prefix_cache
    loss_and_grads(model, PaddingCollator(0)(features(1, 3)))
    loss_and_grads(model, PaddingCollator(0)(features(2, 2)))
    assert (cache.hits, cache.partial_hits, cache.misses, len(cache.states)) == (0, 0, 2, 5)


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2])
def test_kept_and_new_examples_in_one_batch_run_the_frozen_blocks_for_the_new_ones_only(builder):
    """Replay rotation's later epochs: kept task rows beside replay rows not seen before."""
    model = top_block_model(builder)
    assert enable_frozen_prefix_cache(model, ARGS, tokens=1000)
    cache = model._lorafit_prefix_cache
    old, new = features(1, 3), features(2, 3)
    loss_and_grads(model, PaddingCollator(0)(old))
    mixed = PaddingCollator(0)([new[0], old[0], new[1], old[2]])
    ran = []
    hook = model.get_decoder().layers[0].register_forward_hook(lambda module, args, output: ran.append(args[0].shape))
    cache_loss, cache_grads = loss_and_grads(model, mixed)
    hook.remove()
    assert (cache.hits, cache.partial_hits, cache.misses, len(cache.states)) == (0, 1, 1, 5)
    new_tokens = sum(len(row["input_ids"]) for row in new[:2])
    # the lowest block saw the two new examples only, their common system prompt once
    assert [shape[1] for shape in ran] == [new_tokens - len(PREFIX)]
    model._lorafit_prefix_cache = None
    full_loss, full_grads = loss_and_grads(model, mixed)
    assert abs(cache_loss - full_loss) <= 1e-5
    for grad, full in zip(cache_grads, full_grads, strict=True):
        assert ((grad - full).norm() / full.norm()) <= 1e-5


def test_the_cache_stops_keeping_at_its_budget():
    model = top_block_model(build_tiny_llama)
    assert enable_frozen_prefix_cache(model, SimpleNamespace(**{**vars(ARGS), "frozen_prefix_cache_gb": 1.0}), 10)
    cache = model._lorafit_prefix_cache
    cache.budget_bytes = 20 * 32 * 4  # room for about 20 tokens' states
    loss_and_grads(model, PaddingCollator(0)(features(1, 4)))
    assert 0 < len(cache.states) < 4 and cache.bytes <= cache.budget_bytes


def test_when_it_cannot_serve():
    model = top_block_model(build_tiny_llama)
    assert why_not(model, ARGS, 2**30, 1000) is None
    assert "NEFTune" in why_not(model, SimpleNamespace(**{**vars(ARGS), "neftune_noise_alpha": 5}), 2**30, 1000)
    assert "gradient checkpointing" in why_not(model, SimpleNamespace(**{**vars(ARGS), "gradient_checkpointing": True}),
                                               2**30, 1000)
    assert "GB" in why_not(model, ARGS, 2**20, 10**6)
    every_block = build_tiny_llama()
    lorafit.add_lora(every_block, lorafit.LoraConfig(r=4, target_modules="all-linear"))
    assert first_trained_block(every_block.get_decoder()) == 0
    assert "lowest block" in why_not(every_block, ARGS, 2**30, 1000)
    model.config.attention_dropout = 0.1
    assert "dropout" in why_not(model, ARGS, 2**30, 1000)


def test_a_run_on_the_top_block_uses_it_with_the_same_result(quick_args, tmp_path, caplog):
    """Two epochs of a top-block adapter: the second starts at the trained block, and the losses
    and adapter equal a run without the cache."""
    caplog.set_level("INFO", logger="lorafit.train")
    runs = {}
    for gb in ("2", "0"):
        out = tmp_path / f"gb{gb}"
        args = quick_args(out, "--layers_to_transform", "last 50%", "--num_train_epochs", "2", "--max_steps", "-1",
                          "--max_train_samples", "16", "--frozen_prefix_cache_gb", gb)
        assert train_main(args) == 0
        runs[gb] = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "frozen-prefix cache: 4 of 8 batches started at block 1" in caplog.text
    assert "frozen-prefix cache off" not in caplog.text
    cached = [loss for loss in runs["2"] if loss is not None]
    assert cached and cached == pytest.approx([loss for loss in runs["0"] if loss is not None], rel=1e-4)
