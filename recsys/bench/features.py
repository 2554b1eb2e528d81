"""`python -m recsys.bench features`: feature build throughput on >= 10M events.

The synthetic events are generated and written to parquet first (not timed);
the timed region is the real `files` path: scan, validate, sort, dedup,
split, histories, LT labels, sequences, atomic write with manifest.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from recsys.bench.common import PeakRSS, machine_info, print_table, write_json

GOAL_EVENTS_PER_S = 2_000_000


def main(argv: list[str] | None = None) -> int:
    from features.jobs import FeaturesConfig, build_features
    from features.sources import SyntheticConfig, generate_synthetic

    p = argparse.ArgumentParser(prog="python -m recsys.bench features", description=__doc__)
    p.add_argument("--users", type=int, default=1400)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--max-history", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3, help="timed builds; the median is reported")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (tests)")
    p.add_argument("--out", default="bench/results", help="folder for features.json")
    args = p.parse_args(argv)
    if args.quick:
        args.users, args.items, args.max_history, args.repeats = 20, 200, 500, 1

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        source, _ = generate_synthetic(
            SyntheticConfig(users=args.users, items=args.items, max_events=args.max_history, seed=0)
        )
        source.interactions.frame.collect().write_parquet(tmp / "events.parquet")
        source.items.frame.collect().write_parquet(tmp / "items.parquet")
        gen_s = time.perf_counter() - t0
        cfg = FeaturesConfig(source="files", interactions=str(tmp / "events.parquet"), items=str(tmp / "items.parquet"))
        runs = []
        for i in range(args.repeats):
            with PeakRSS() as mem:
                t = time.perf_counter()
                result = build_features(cfg, tmp / f"out{i}", force=True, log=lambda _m: None)
                secs = time.perf_counter() - t
            runs.append((secs, mem.peak_mb))
        events = result.manifest["outputs"]["interactions.parquet"]["rows"]
        runs.sort()
        secs, peak = runs[len(runs) // 2]
        # the rerun of an unchanged input: the manifest check alone
        t = time.perf_counter()
        skipped = build_features(cfg, tmp / "out0", log=lambda _m: None)
        skip_s = time.perf_counter() - t
        assert skipped.skipped

    row = {
        "events": events,
        "users": args.users,
        "seconds": secs,
        "events_per_s": events / secs,
        "peak_mb": peak,
        "rerun_skip_s": skip_s,
        "generate_s": gen_s,
        "goal_events_per_s": GOAL_EVENTS_PER_S,
    }
    print_table([row], list(row))
    verdict = "PASS" if row["events_per_s"] >= GOAL_EVENTS_PER_S else "MISS"
    print(f"\ngoal >= {GOAL_EVENTS_PER_S / 1e6:.0f}M events/s end to end: {verdict} ({row['events_per_s'] / 1e6:.2f}M/s)")
    path = write_json("features", {"machine": machine_info(), "quick": args.quick, **row}, Path(args.out))
    print(f"wrote {path}")
    return 0
