"""Shared benchmark plumbing: timing (plain, interleaved, contention-screened),
peak memory, machine peak, allocator and load, JSON output."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("bench/results")


def median_ms(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in milliseconds over `repeats` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the starting level while the block runs (MB).

    Samples /proc/self/statm every `interval_s` on a thread: ru_maxrss is
    process-wide and never resets, so it cannot separate configurations.
    Short spikes between samples can be missed; it is a benchmark figure, not
    an accounting one.
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0

    def __enter__(self) -> "PeakRSS":
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_mb = (self._peak - self._base) / 2**20


def peak_mb(fn: Callable[[], Any]) -> float:
    """RSS growth (MB) during one call of `fn` (`PeakRSS`)."""
    with PeakRSS() as peak:
        fn()
    return peak.peak_mb


class OtherLoad:
    """Fraction of the machine's CPU used by OTHER processes while the block runs.

    Busy jiffies from /proc/stat minus this process's own CPU time (os.times),
    over wall time x cores. Resolution is one clock tick (1 / SC_CLK_TCK s), so it
    is a screen for contended timings, not an accounting figure. None where /proc is absent.
    """

    def _read(self) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()

    def __enter__(self) -> "OtherLoad":
        self._start = self._read()
        self.fraction: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        if self._start is None or end is None:
            return
        wall = max(end[2] - self._start[2], 1e-9)
        other = (end[0] - self._start[0]) - (end[1] - self._start[1])
        self.fraction = max(0.0, other / (wall * (os.cpu_count() or 1)))


def timed_quietly(
    fns: list[Callable[[], Any]],
    repeats: int,
    tries: int,
    max_other: float = 0.1,
    timer: Callable[[list[Callable[[], Any]], int], list[float]] | None = None,
) -> tuple[list[float], float | None]:
    """`timer(fns, repeats)` (default `interleaved_ms`), retried up to `tries`
    times while other processes load the CPU.

    Returns the medians of the least-contended attempt and its other-load
    fraction. With OpenMP threads on shared cores, one busy neighbour can stall
    every parallel region, inflating small ops far more than big ones.
    """
    timer = timer or interleaved_ms
    best: tuple[list[float], float | None] | None = None
    for attempt in range(max(1, tries)):
        if attempt:
            time.sleep(2.0 * attempt)  # let a neighbour's burst pass
        with OtherLoad() as load:
            medians = timer(fns, repeats)
        if best is None or (load.fraction is not None and (best[1] is None or load.fraction < best[1])):
            best = (medians, load.fraction)
        if load.fraction is None or load.fraction <= max_other:
            break
    assert best is not None
    return best


def interleaved_ms(fns: list[Callable[[], Any]], repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time (ms) of each fn, timed in turns with a rotating order.

    On a shared machine background load comes and goes within seconds, so
    timing a candidate and its reference back to back in the same loop keeps
    their ratio honest where separate timing blocks would not.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        for j in range(len(fns)):
            k = (i + j) % len(fns)
            t0 = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(ts) for ts in times]


def blocked_ms(fns: list[Callable[[], Any]], blocks: int, per_block: int) -> list[float]:
    """Median wall time (ms) of each fn, each timed in its own runs of calls.

    `blocks` rounds; in each, every fn in turn (rotating order) makes one
    untimed call and then `per_block` timed calls in a row. A fn is thus timed
    in its own steady state (its weights and code warm, not just after another
    fn's calls have evicted them), while the rounds still spread background
    load over all fns alike. Give each fn a stream of distinct inputs
    (`RequestStream`) and that steady state is a server's, with each
    request's own data cold.
    """
    times: list[list[float]] = [[] for _ in fns]
    for b in range(blocks):
        for j in range(len(fns)):
            k = (b + j) % len(fns)
            fns[k]()  # the first call after a switch: not timed
            for _ in range(per_block):
                t0 = time.perf_counter()
                fns[k]()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(ts) for ts in times]


class RequestStream:
    """Round-robin over distinct requests: each call of `next()` returns the next.

    Sized by `cold_pool_size` so the requests together exceed the last-level
    cache: a request's data is then cold when its turn comes, as a new
    request's is on a server.
    """

    def __init__(self, requests: Sequence[Any]) -> None:
        if not requests:
            raise ValueError("RequestStream needs at least one request")
        self.requests = list(requests)
        self._i = -1

    def next(self) -> Any:
        self._i = (self._i + 1) % len(self.requests)
        return self.requests[self._i]


def cold_pool_size(request_bytes: int, cache_bytes: int = 64 << 20, cap: int = 256) -> int:
    """Distinct requests so that together they exceed `cache_bytes` (default
    64 MiB, twice this machine's 32 MiB L3), at least 2, at most `cap`."""
    return max(2, min(cap, -(-cache_bytes // max(1, request_bytes))))


def malloc_keep() -> bool:
    """Make glibc keep freed memory: no mmap for large blocks, no heap trimming.

    With the default allocator every (C, L) logits buffer of the reference is a
    fresh mmap whose page faults add to its time; a serving process with a
    caching allocator would not pay them, so this mode shows the speedups
    against that faster reference. False where glibc's mallopt is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def loadavg() -> float | None:
    """The 1-minute load average, or None where /proc is absent."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None



def matmul_gflops(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Achieved GFLOP/s of a plain float32 torch matmul (m,k)@(k,n) here, now."""
    import torch

    a = torch.randn(m, k)
    b = torch.randn(k, n)
    ms = median_ms(lambda: a @ b, repeats=repeats)
    return 2.0 * m * k * n / (ms * 1e-3) / 1e9


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def apply_quick(parser: Any, args: Any, values: dict[str, Any]) -> None:
    """`--quick`: set `values` (dest -> value) on `args`; an option among them
    that the user also gave (a value other than its default) is a usage
    error, never silently overridden (the JSON would record the quick value).
    Without --out the smoke run writes under `quick_out` (RESULTS_DIR/quick,
    not committed), never over the committed results."""
    given = [k for k in values if getattr(args, k) != parser.get_default(k)]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        parser.error(f"--quick sets {flags} itself: drop --quick or {flags}")
    for k, v in values.items():
        setattr(args, k, v)
    args.out = quick_out(parser, args.out)


def quick_out(parser: Any, out: Any) -> Any:
    """`out` unless it is the parser's default results folder: then its `quick` subfolder (same type)."""
    default = parser.get_default("out")
    return type(default)(Path(default) / "quick") if out == default else out


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a size or a count of runs)."""
    return _int_at_least(text, 1)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (nan and inf are refused: nan > x is always false)."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0)


def seed_int(text: str) -> int:
    """argparse type: a seed, 0 <= seed < 2**32 (numpy's and torch's generators take no more)."""
    import argparse

    value = _int_at_least(text, 0)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be < 2**32, got {value}")
    return value


def _int_at_least(text: str, low: int) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print rows as an aligned text table (floats with 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_json(name: str, payload: Any, results_dir: Path = RESULTS_DIR) -> Path:
    """Write `results_dir/NAME.json` atomically and return its path."""
    from features.core.numeric import json_safe

    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    # strict JSON: a NaN or inf is written as null (json's default writes the non-standard NaN)
    tmp.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
