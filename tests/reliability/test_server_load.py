"""Promise 9 under load: the short version of `bench/bench_serve_load.py` (the same clients and
verdicts) on the tiny model: 16 streaming clients for 10 s against a real `lorafit serve` process,
with malformed, oversized and disconnecting clients mixed in, and a queue small enough to fill.

Asserted: no 5xx, the server alive and answering, every well-formed request answered whole (429s
waited out as Retry-After says), each abusive request answered with its 4xx, 429s only while
max_batch_size + max_queued_requests requests were open and always with Retry-After, nothing
alarming in the server's log, and the server's memory bounded while it works."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from reliability_helpers import REPO

_spec = importlib.util.spec_from_file_location("bench_serve_load", REPO / "bench" / "bench_serve_load.py")
bench = sys.modules["bench_serve_load"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(bench)

# Growth of the server's RSS from before the load to its highest point during it. The KV cache of
# 4 rows of the tiny model is under 1 MB; what grows is Python and allocator state.
RSS_GROWTH_LIMIT_MB = 150


@pytest.fixture(scope="module")
def result(tiny_model_dir):
    config = bench.LoadConfig(model=tiny_model_dir, clients=16, duration=10, max_batch_size=4, max_queued_requests=4,
                              request_timeout=60, max_tokens=64, drain_seconds=60, env={"OMP_NUM_THREADS": "1"})
    return bench.run(config, log=lambda _text: None)


def test_every_promise_holds_under_load(result):
    broken = {promise: failures[:5] for promise, failures in bench.verdicts(result).items() if failures}
    assert not broken, broken


def test_the_load_was_real(result):
    """Each kind of client ran, and the queue did fill (else the 429 path went untested)."""
    figures = bench.summary(result)
    roles = {o.role for o in result.outcomes}
    assert roles == {"streaming", "malformed", "oversized", "disconnect"}
    assert figures["well-formed requests answered"] >= 2 * result.config.clients
    assert figures["429s"] > 0
    assert any(o.role == "disconnect" and o.status is None for o in result.outcomes)  # got in, and left


def test_memory_stays_bounded(result):
    figures = bench.summary(result)
    growth = figures["RSS max during load MB"] - figures["RSS before load MB"]
    assert growth < RSS_GROWTH_LIMIT_MB, figures
