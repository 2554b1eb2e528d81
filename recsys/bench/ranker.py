"""Benchmark: ranker TRAINING samples/s and peak memory per history encoder.

usage: python -m recsys.bench ranker [--quick] [--out DIR] [--seed S]

One timed call is one full training step of `RankerTrain` (forward over the
item/user/genre tables, history encoder, over-arch and both heads, backward,
Adam on the dense part, row-wise Adagrad on the tables) on a synthetic batch
of 32 requests (`recsys.data.synthetic_batch`), each with exactly L history
events and C candidates. A sample is one candidate: samples/s = 32 C / the
median step time (of 3 after a warm-up step; 1 when the warm-up step took
longer than --slow-s seconds, to bound the default run's length).
Grid: L in {1k, 10k, 50k}, C in {1, 100, 1000}, encoders mean (masked
mean), reference (exact target attention), truncated and compact (SVD-attention
modes, R = 32), D = 64. peak_mb is the RSS growth while the
timed steps run (recsys.bench.common.PeakRSS).

Skips: SVD "truncated" materialises (B, C, L) logits (softmax output and
their gradients too); a row whose estimate (4 tensors of B C L float32 + the
history activations) exceeds --mem-budget-gb is not run and is written with
"skipped" and the estimate. Exact target attention ("reference",
`TargetAttention`) runs torch's fused kernel, which holds no (B, C, L)
buffers, so only its history activations count.

Goal (reported PASS/MISS, never adjusted): compact at L = 10k, C = 1000 has
>= 5x the samples/s of the reference. The report also lists every (L, C)
where compact is slower than the reference: with few candidates the O(L D^2)
Gram + eigh per request costs more than the O(C L D) attention it replaces.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.bench.common import (
    RESULTS_DIR,
    PeakRSS,
    apply_quick,
    machine_info,
    nonnegative_int,
    positive_float,
    positive_int,
    print_table,
    seed_int,
    write_json,
)

ENCODERS = {"mean": "mean", "reference": "reference", "truncated": "svd_truncated", "compact": "svd_compact"}
COLUMNS = ["L", "C", "encoder", "samples_per_s", "ms_per_step", "peak_mb", "speedup_vs_reference", "skipped"]
GOAL_SPEEDUP = 5.0


def _estimate_gb(encoder: str, b: int, length: int, c: int, d: int) -> float:
    hist = 8 * b * length * d * 4  # lookups, padded copy, float64 Gram input, gradients
    if encoder == "truncated":
        return (4 * b * c * length * 4 + hist) / 2**30
    return hist / 2**30


def _step_fn(encoder: str, length: int, c: int, args: argparse.Namespace, batch: Any, spec: Any):
    from recsys.models.ranker import Ranker, RankerConfig, RankerTrain
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    cfg = RankerConfig(embedding_dim=args.dim, history_encoder=ENCODERS[encoder], svd_rank=args.rank,
                       dense_arch_layer_sizes=(32,), over_arch_layer_sizes=(128, 64))
    model = Ranker(cfg, spec, None, torch.Generator().manual_seed(args.seed))
    train = RankerTrain(model)
    tables = {id(p) for p in model.embedding_tables()}
    dense = torch.optim.Adam([p for p in train.parameters() if id(p) not in tables], lr=1e-3)
    sparse = RowWiseAdagrad(model.embedding_tables(), lr=0.01)

    def step() -> None:
        loss, _ = train(batch)
        dense.zero_grad(set_to_none=True)
        sparse.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()
        sparse.step()

    return step


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from recsys.data import FeatureSpec, synthetic_batch

    spec = FeatureSpec(n_items=args.items, n_users=1000, user_fields=(("user", 1000),),
                       item_fields=(("item_genres", 20),), dense_names=("a", "b", "c", "d"))
    rows: list[dict[str, Any]] = []
    for length in args.lengths:
        for c in args.candidates:
            batch = synthetic_batch(spec, args.requests, length, c, np.random.default_rng([args.seed, length, c]))
            for encoder in args.encoders:
                row: dict[str, Any] = {"L": length, "C": c, "encoder": encoder, "samples_per_s": None,
                                       "ms_per_step": None, "peak_mb": None}
                est = _estimate_gb(encoder, args.requests, length, c, args.dim)
                if est > args.mem_budget_gb:
                    row["skipped"] = (f"estimated {est:.1f} GiB > budget {args.mem_budget_gb:g} GiB "
                                      "((B, C, L) logits, softmax and their gradients)")
                    rows.append(row)
                    print(f"L={length} C={c} {encoder}: skipped ({row['skipped']})", flush=True)
                    continue
                step = _step_fn(encoder, length, c, args, batch, spec)
                t0 = time.perf_counter()
                step()  # warm-up: allocator, optimiser state
                # slow rows (a warm-up step over --slow-s) get one timed step: their noise is small
                repeats = 1 if time.perf_counter() - t0 > args.slow_s else args.repeats
                times = []
                with PeakRSS() as mem:
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        step()
                        times.append(time.perf_counter() - t0)
                ms = float(np.median(times) * 1e3)
                row.update(samples_per_s=args.requests * c / (ms / 1e3), ms_per_step=ms, peak_mb=mem.peak_mb,
                           repeats=repeats)
                rows.append(row)
                print(f"L={length} C={c} {encoder}: {row['samples_per_s']:.0f} samples/s, {ms:.0f} ms/step, "
                      f"peak {mem.peak_mb:.0f} MB", flush=True)
                del step
    by = {(r["L"], r["C"], r["encoder"]): r for r in rows}
    for r in rows:
        ref = by.get((r["L"], r["C"], "reference"))
        if r["samples_per_s"] and ref and ref["samples_per_s"]:
            r["speedup_vs_reference"] = r["samples_per_s"] / ref["samples_per_s"]
    return rows


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["L"], r["C"], r["encoder"]): r for r in rows}
    comp, ref = by.get((10_000, 1_000, "compact")), by.get((10_000, 1_000, "reference"))
    value = None
    if comp and ref and comp["samples_per_s"] and ref["samples_per_s"]:
        value = comp["samples_per_s"] / ref["samples_per_s"]
    out = [{"goal": "compact vs reference samples/s at L=10k, C=1000", "target": GOAL_SPEEDUP, "value": value,
            "status": "n/a" if value is None else ("PASS" if value >= GOAL_SPEEDUP else "MISS")}]
    slower = [
        {"L": r["L"], "C": r["C"], "speedup_vs_reference": r["speedup_vs_reference"]}
        for r in rows
        if r["encoder"] == "compact" and r.get("speedup_vs_reference") is not None and r["speedup_vs_reference"] < 1.0
    ]
    out.append({"goal": "where compact is slower than the reference (factorisation costs more than it saves)",
                "cases": slower})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recsys.bench ranker", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds), for tests")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for ranker.json (default: %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for data and weights (default: %(default)s)")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[1_000, 10_000, 50_000],
                   help="history lengths L (default: %(default)s)")
    p.add_argument("--candidates", type=positive_int, nargs="+", default=[1, 100, 1_000],
                   help="candidates per request C (default: %(default)s)")
    p.add_argument("--encoders", nargs="+", choices=list(ENCODERS), default=list(ENCODERS))
    p.add_argument("--requests", type=positive_int, default=32, help="requests per batch (default: %(default)s)")
    p.add_argument("--dim", type=positive_int, default=64, help="embedding dim D (default: %(default)s)")
    p.add_argument("--rank", type=positive_int, default=32, help="SVD rank R, at most --dim (default: %(default)s)")
    p.add_argument("--items", type=positive_int, default=20_000, help="item table rows")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed steps per row; the median is reported")
    p.add_argument("--slow-s", type=positive_float, default=5.0, help="rows whose warm-up step exceeds this get 1 timed step")
    p.add_argument("--mem-budget-gb", type=positive_float, default=16.0, help="skip rows estimated above this")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (0 = torch default; --quick uses 1)")
    args = p.parse_args(argv)
    if args.quick:
        apply_quick(p, args, {"lengths": [50, 200], "candidates": [1, 20], "requests": 4, "dim": 16, "rank": 8,
                              "items": 500, "repeats": 1})
        args.threads = args.threads or 1
    if args.rank > args.dim:
        p.error(f"--rank {args.rank} must be at most --dim {args.dim}")
    if args.threads:
        torch.set_num_threads(args.threads)  # a CLI entry point: the one place global state is set
    t0 = time.perf_counter()
    rows = run(args)
    print()
    print_table(rows, COLUMNS)
    goal_rows = goals(rows)
    print()
    for g in goal_rows:
        if "target" in g:
            value = "n/a" if g["value"] is None else f"{g['value']:.1f}x"
            print(f"{g['status']:<4} {g['goal']}: {value} (target >= {g['target']:g}x)")
        else:
            cases = ", ".join(f"L={c['L']} C={c['C']} ({c['speedup_vs_reference']:.2f}x)" for c in g["cases"]) or "none"
            print(f"     {g['goal']}: {cases}")
    payload = {
        "machine": machine_info(),
        "quick": args.quick,
        "seed": args.seed,
        "grid": {"L": args.lengths, "C": args.candidates, "encoders": args.encoders, "requests": args.requests,
                 "D": args.dim, "R": args.rank, "items": args.items, "repeats": args.repeats,
                 "mem_budget_gb": args.mem_budget_gb, "threads": torch.get_num_threads()},
        "rows": rows,
        "goals": goal_rows,
        "seconds": time.perf_counter() - t0,
    }
    path = write_json("ranker", payload, results_dir=args.out)
    print(f"\nwrote {path} ({payload['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
