"""Dropout drawn as the positions of the dropped elements (lora/dropout.py): its law, its seeding, and
what the plain path keeps for the backward pass."""

import math

import pytest
import torch

from lorafit.lora import LoraLinear, use_fused
from lorafit.lora import dropout as dropout_module
from lorafit.lora.dropout import InputDropout, drop_positions, geometric_gaps

CPU = torch.device("cpu")


def gap_frequencies_match_the_geometric_law(gaps: torch.Tensor, p: float) -> None:
    """Observed frequencies of gaps 1..30 and of the tail within 5 standard errors of the exact law."""
    n = gaps.numel()
    for value in list(range(1, 31)):
        expected = (1 - p) ** (value - 1) * p
        observed = (gaps == value).double().mean().item()
        assert abs(observed - expected) <= 5 * math.sqrt(expected * (1 - expected) / n) + 1e-9, value
    tail = (1 - p) ** 30
    observed_tail = (gaps > 30).double().mean().item()
    assert abs(observed_tail - tail) <= 5 * math.sqrt(tail * (1 - tail) / n) + 1e-9
    assert gaps.min().item() >= 1


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_gaps_follow_the_geometric_law(p):
    torch.manual_seed(0)
    gap_frequencies_match_the_geometric_law(geometric_gaps(400_000, p, CPU), p)


def test_the_accelerator_formula_follows_the_same_law():
    """The GPU branch (torch's generator and operators) is plain torch: run here on the CPU."""
    torch.manual_seed(0)
    gap_frequencies_match_the_geometric_law(dropout_module._torch_gaps(400_000, 0.05, CPU), 0.05)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_positions_are_a_bernoulli_sequence(p):
    torch.manual_seed(1)
    n = 300_000
    positions = drop_positions(n, p, CPU)
    assert positions.dtype == torch.int64
    assert positions[0] >= 0 and positions[-1] < n and bool((positions[1:] > positions[:-1]).all())
    assert abs(positions.numel() - n * p) <= 5 * math.sqrt(n * p * (1 - p))
    # each position dropped with probability p, independently of where it is: both halves alike
    first_half = (positions < n // 2).sum().item()
    assert abs(first_half - n * p / 2) <= 5 * math.sqrt(n / 2 * p * (1 - p))


def test_positions_past_the_first_draw_continue_the_sequence(monkeypatch):
    """Enough gaps are drawn to cover the input but in ~1e-15 of calls; when they fall short the
    sequence continues from the last drop (forced here by drawing too few)."""
    monkeypatch.setattr(dropout_module, "_EXTRA_DRAWS_SIGMAS", -3)
    torch.manual_seed(2)
    n, p = 200_000, 0.05
    positions = drop_positions(n, p, CPU)
    assert bool((positions[1:] > positions[:-1]).all()) and positions[-1] < n
    assert abs(positions.numel() - n * p) <= 5 * math.sqrt(n * p * (1 - p))
    gap_frequencies_match_the_geometric_law(torch.diff(positions), p)


def test_masks_are_seeded_by_torch_and_differ_between_draws():
    dropout = InputDropout(0.1).train()
    x = torch.ones(200, 300)
    torch.manual_seed(3)
    first = dropout.dropped_positions(x)
    second = dropout.dropped_positions(x)
    torch.manual_seed(3)
    assert torch.equal(first, dropout.dropped_positions(x))  # exact resume, gradient checkpointing's replay
    assert not torch.equal(first, second)


def test_masked_is_unscaled_in_the_input_dtype_and_dropout_is_unbiased():
    torch.manual_seed(0)
    dropout = InputDropout(0.1).train()
    x = torch.ones(1000, 1000)
    kept = dropout.masked(x.bfloat16())
    assert kept.dtype == torch.bfloat16 and set(kept.unique().tolist()) == {0.0, 1.0}
    assert kept.float().mean().item() == pytest.approx(0.9, abs=2e-3)
    assert dropout(x).mean().item() == pytest.approx(1.0, abs=3e-3)  # as nn.Dropout
    assert dropout.p == 0.1 and dropout.keep_scale == pytest.approx(1 / 0.9)  # p as given, not rounded
    assert dropout.masked(x.t()).shape == (1000, 1000)  # any layout; positions read it row-major
    assert not InputDropout(0.0).train().active
    assert InputDropout(1e-9).train().active
    assert torch.equal(dropout.eval().masked(x), x)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_a_probability_outside_zero_one_is_refused(p):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        InputDropout(p)


def test_the_plain_path_keeps_the_masked_copy_and_positions_not_a_full_size_mask():
    layer = LoraLinear(torch.nn.Linear(64, 16, bias=False).requires_grad_(False), r=4, lora_alpha=8,
                       lora_dropout=0.2).train()
    use_fused(layer, False)
    x = torch.randn(50, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(0)
        layer(x).sum().backward()
    full_size = [t for t in saved if t.numel() == x.numel()]
    assert [t.dtype for t in full_size] == [torch.float32]  # the masked copy A's gradient reads
    positions = next(t for t in saved if t.dtype == torch.int64)
    torch.manual_seed(0)
    assert torch.equal(positions, layer.lora_dropout.dropped_positions(x))
    expected = x.detach().flatten().index_fill(0, positions, 0.0).view(x.shape)
    assert torch.equal(full_size[0], expected)


def test_the_same_seed_gives_the_same_mask_in_another_process():
    """A run resumed in a new process (after a crash) must draw the masks the uninterrupted run drew."""
    import subprocess
    import sys

    code = ("import torch; from lorafit.lora.dropout import drop_positions; torch.manual_seed(11); "
            "print(drop_positions(100_000, 0.1, torch.device('cpu')).sum().item())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    torch.manual_seed(11)
    assert int(other) == drop_positions(100_000, 0.1, CPU).sum().item()
