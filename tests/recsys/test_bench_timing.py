"""The benchmarks' timing protocols (recsys.bench.common): blocked runs and request streams."""

from __future__ import annotations

import pytest

from recsys.bench.common import RequestStream, blocked_ms, cold_pool_size


def test_blocked_ms_times_each_fn_in_its_own_runs_after_an_untimed_switch():
    calls: list[str] = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    medians = blocked_ms(fns, blocks=2, per_block=3)
    assert len(medians) == 2 and all(m >= 0 for m in medians)
    # round 0: a (1 untimed + 3), then b; round 1 rotates: b first, then a
    assert calls == ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4


def test_blocked_ms_leaves_the_switch_call_out_of_the_timing():
    import time

    state = {"n": 0}

    def slow_first_of_run():
        state["n"] += 1
        if state["n"] % 3 == 1:  # the first call of each run of 3 (1 untimed + 2 timed)
            time.sleep(0.05)

    (ms,) = blocked_ms([slow_first_of_run], blocks=3, per_block=2)
    assert ms < 20  # the 50 ms switch calls were not timed


def test_request_stream_round_robin_and_pool_size():
    stream = RequestStream(["r0", "r1", "r2"])
    assert [stream.next() for _ in range(7)] == ["r0", "r1", "r2", "r0", "r1", "r2", "r0"]
    with pytest.raises(ValueError):
        RequestStream([])
    assert cold_pool_size(2_560_000 + 256_000) == 24  # L=10k, C=1000, D=64 float32: > 64 MiB together
    assert cold_pool_size(13_000_000) == 6
    assert cold_pool_size(1 << 30) == 2  # at least two distinct requests
    assert cold_pool_size(10) == 256  # capped
