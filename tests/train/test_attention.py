"""`lorafit_sdpa`: packed rows per example, right-padded batches unmasked, the same numbers as stock sdpa."""

import pytest
import torch
import torch.nn.functional as F

import lorafit
from lorafit.data.collate import PackingCollator, PaddingCollator
from lorafit.train import attention
from lorafit.train.attention import NAME, segment_bounds, use_training_attention
from lorafit.train.trained_token_loss import use_trained_token_loss
from model_builders import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2

LENGTHS = (5, 9, 3, 12)


def examples():
    generator = torch.Generator().manual_seed(0)
    features = []
    for length in LENGTHS:
        ids = torch.randint(0, 128, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})  # a 2-token "prompt"
    return features


def adapted(builder):
    model = builder()
    model.config._attn_implementation = "sdpa"
    model.config.use_cache = False
    lorafit.add_lora(model, lorafit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                               lora_dropout=0.0))
    return model


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2, build_tiny_gpt2])
@pytest.mark.parametrize("collator", [PackingCollator(0), PaddingCollator(0)], ids=["packed", "padded"])
def test_same_loss_and_gradients_as_stock_sdpa(builder, collator):
    model = adapted(builder)
    batch = collator(examples())
    expected_loss, expected_grads = loss_and_grads(model, batch)
    assert use_training_attention(model) and model.config._attn_implementation == NAME
    loss, grads = loss_and_grads(model, batch)
    assert abs(loss - expected_loss) <= 1e-5
    for grad, expected in zip(grads, expected_grads):
        assert ((grad - expected).norm() / expected.norm()) <= 1e-5


def test_packed_loss_is_the_loss_of_the_examples_run_alone():
    model = adapted(build_tiny_llama)
    use_training_attention(model)
    use_trained_token_loss(model)
    packed = model(**PackingCollator(0)(examples())).loss
    total, count = 0.0, 0
    for example in examples():
        alone = PaddingCollator(0)([example])
        trained = int((alone["labels"][0, 1:] != -100).sum())
        total += model(**alone).loss.item() * trained
        count += trained
    assert abs(packed.item() - total / count) <= 1e-5


def test_the_fast_kernels_are_the_ones_used(monkeypatch):
    """Packed: one unmasked causal call per example; right-padded: unmasked causal calls, no mask."""
    calls = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, is_causal=False, **kwargs):
        calls.append((query.shape[2], attn_mask is None, is_causal))
        return original(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    model = adapted(build_tiny_llama)
    use_training_attention(model)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(**PackingCollator(0)(examples()))
    layers = model.config.num_hidden_layers
    assert sorted(calls) == sorted([(length, True, True) for length in LENGTHS] * layers)
    calls.clear()
    with torch.no_grad():
        model(**PaddingCollator(0)(examples()))
    assert calls == [(max(LENGTHS), True, True)] * layers


def test_short_half_precision_segments_attend_in_float32_on_a_cpu(monkeypatch):
    """torch's CPU flash attention is slow in bf16 on short sequences: those segments run in float32,
    the output back in bf16; loss and gradients are no further from the float32 model's than stock
    bf16 sdpa's (in a model all in bf16, adapters included, some gradients are off by ~40% either way)."""
    model = adapted(build_tiny_llama)
    batch = PackingCollator(0)(examples())
    use_training_attention(model)
    exact_loss, exact_grads = loss_and_grads(model, batch)  # float32 throughout: the reference
    model.to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    stock_loss, stock_grads = loss_and_grads(model, batch)  # stock bf16 sdpa, with its block-diagonal mask
    use_training_attention(model)
    seen = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        half = query.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")  # computed in bf16
        seen.append((key.shape[2], torch.bfloat16 if half else torch.float32))
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    loss, grads = loss_and_grads(model, batch)
    layers = model.config.num_hidden_layers
    assert sorted(seen) == sorted([(length, torch.float32) for length in LENGTHS] * layers)
    assert all(grad.dtype == torch.bfloat16 for grad in grads)

    def error(grads_):
        return max(float((g.float() - e).norm() / e.norm()) for g, e in zip(grads_, exact_grads))

    assert abs(stock_loss.float() - exact_loss) <= 1e-2 * abs(exact_loss)
    assert abs(loss.float() - exact_loss) <= 1e-2 * abs(exact_loss)
    assert error(grads) <= 1.25 * error(stock_grads)

    seen.clear()  # segments at or above the threshold keep the half-precision kernel
    monkeypatch.setattr(attention, "CPU_FLOAT32_ATTENTION_BELOW", 9)
    with torch.no_grad():
        model(**batch)
    assert sorted(set(seen)) == [(3, torch.float32), (5, torch.float32), (9, torch.bfloat16), (12, torch.bfloat16)]

    seen.clear()  # under autocast (`--bf16` with a float32 model) too, and the output in autocast's dtype
    model.float()
    attention_outputs = []
    model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda _, args: attention_outputs.append(args[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch)
    assert attention_outputs[0].dtype == torch.bfloat16
    assert sorted(set(seen)) == [(3, torch.float32), (5, torch.float32), (9, torch.bfloat16), (12, torch.bfloat16)]


def test_left_padding_and_caches_keep_the_mask():
    model = adapted(build_tiny_llama)
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        use_training_attention(model)
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0, 2:], expected[0, 2:])
    torch.testing.assert_close(got[1], expected[1])


def test_segment_bounds_and_models_that_keep_their_attention():
    assert segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])) == [(0, 3), (3, 5), (5, 9)]
    assert segment_bounds(torch.tensor([[4, 5, 6]])) == [(0, 3)]
    model = build_tiny_llama()
    model.config._attn_implementation = "eager"
    assert not use_training_attention(model)  # an explicit other choice is left alone
    windowed = build_tiny_qwen2(use_sliding_window=True, sliding_window=4)
    windowed.config._attn_implementation = "sdpa"
    assert not use_training_attention(windowed)


def unpadded_rows_with_stock_numbers(builder, features, monkeypatch) -> list:
    """The packed rows `lorafit_sdpa` made of a padded batch, after checking that its loss and
    gradients are stock sdpa's on the padded batch."""
    model = adapted(builder)
    use_trained_token_loss(model)
    batch = PaddingCollator(0)(features)
    expected_loss, expected_grads = loss_and_grads(model, batch)  # stock sdpa, padded
    use_training_attention(model)
    rows = []
    original = attention.unpad_to_packed_row
    monkeypatch.setattr(attention, "unpad_to_packed_row", lambda *a: rows.append(original(*a)) or rows[-1])
    loss, grads = loss_and_grads(model, batch)
    assert abs(loss - expected_loss) <= 1e-5
    for grad, expected in zip(grads, expected_grads):
        assert ((grad - expected).norm() / expected.norm()) <= 1e-5
    return rows


def test_padded_batches_are_unpadded_into_one_row_with_the_same_loss_and_gradients(monkeypatch):
    rows = unpadded_rows_with_stock_numbers(build_tiny_llama, examples(), monkeypatch)
    assert rows[0][0].shape == (1, sum(LENGTHS))  # no padding left
    assert rows[0][1].tolist() == [[p for length in LENGTHS for p in range(length)]]


def prefixed_examples(prefix_length: int = 7):
    """Examples that begin with the same untrained tokens (a chat template's system prompt)."""
    generator = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 128, (prefix_length,), generator=generator).tolist()
    features = []
    for length in LENGTHS:
        ids = prefix + torch.randint(0, 128, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [-100] * (prefix_length + 2) + ids[prefix_length + 2:]})
    return features, prefix_length


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2, build_tiny_gpt2])
def test_a_shared_prefix_is_computed_once_with_the_same_loss_and_gradients(builder, monkeypatch):
    features, prefix = prefixed_examples()
    rows = unpadded_rows_with_stock_numbers(builder, features, monkeypatch)
    total = sum(prefix + length for length in LENGTHS)
    assert rows[0][0].shape == (1, total - prefix * (len(LENGTHS) - 1))  # the prefix once
    later = [prefix + p for length in LENGTHS[1:] for p in range(length)]
    assert rows[0][1].tolist() == [list(range(prefix + LENGTHS[0])) + later]


def test_no_prefix_is_shared_with_a_model_whose_attention_does_not_read_positions(monkeypatch):
    """Shared only when a probe forward went through `lorafit_sdpa` by position_ids."""
    features, prefix = prefixed_examples()
    model = adapted(build_tiny_llama)
    use_trained_token_loss(model)
    use_training_attention(model)
    batch = PaddingCollator(0)(features)
    monkeypatch.setattr(attention, "_row_layout", lambda position_ids: ([(0, position_ids.shape[-1])], [0]))
    rows = []
    original = attention.unpad_to_packed_row
    monkeypatch.setattr(attention, "unpad_to_packed_row", lambda *a: rows.append(original(*a)) or rows[-1])
    with torch.no_grad():
        model(**batch)
        model(**batch)
    assert all(row[0].shape == (1, sum(prefix + length for length in LENGTHS)) for row in rows)


def test_only_an_untrained_common_prefix_is_shared():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 1, 2], [5, 6, 7, 8, 9, 10, 3, 0]])
    real = torch.tensor([[1] * 8, [1] * 7 + [0]]).bool()
    untrained = torch.full((2, 8), -100)
    assert attention.shared_untrained_prefix(ids, real, untrained) == 6
    trained = untrained.clone()
    trained[1, 4] = 3  # a label predicted from position 4: the prefix stops before it
    assert attention.shared_untrained_prefix(ids, real, trained) == 4
    assert attention.shared_untrained_prefix(ids[:, :3], real[:, :3], untrained[:, :3]) == 0  # too short
    assert attention.shared_untrained_prefix(ids[:1], real[:1], untrained[:1]) == 0  # one row
    assert attention.shared_prefixes(torch.tensor([[0, 1, 2, 3, 2, 3, 0, 1, 5]])) == [0, 2, 0, 0]


def test_packed_rows_share_their_examples_prefix_too(monkeypatch):
    features, prefix = prefixed_examples()
    model = adapted(build_tiny_llama)
    use_trained_token_loss(model)
    batch = PackingCollator(0)(features)
    expected_loss, expected_grads = loss_and_grads(model, batch)  # stock sdpa, block-diagonal mask
    use_training_attention(model)
    rows = []
    original = attention.share_packed_prefix
    monkeypatch.setattr(attention, "share_packed_prefix", lambda *a: rows.append(original(*a)) or rows[-1])
    loss, grads = loss_and_grads(model, batch)
    assert abs(loss - expected_loss) <= 1e-5
    for grad, expected in zip(grads, expected_grads):
        assert ((grad - expected).norm() / expected.norm()) <= 1e-5
    assert rows[0][0].shape == (1, sum(prefix + length for length in LENGTHS) - prefix * (len(LENGTHS) - 1))
    plain = PackingCollator(0)(examples())  # nothing in common
    assert attention.share_packed_prefix(plain["input_ids"], plain["position_ids"], plain["labels"]) is None
