"""`python -m recsys.bench features`: feature build throughput, per engine and size.

The synthetic events are generated and written to parquet first (not timed);
the timed region is the real `files` path: scan, validate, sort, dedup,
split, histories, LT labels, sequences, atomic write with manifest. The same
workload runs on either engine (`--engine polars|spark|both`) at each size
(`--events 1,10,50`: millions of events, by scaling the number of users).

Spark runs reuse one JVM: `startup_s` is the cold start of the first session
(JVM + SparkContext), reported apart; `seconds` is a whole build with a warm
JVM (it still starts and stops its own SparkContext). `peak_mb` is the RSS
growth of this process and its children (the JVM and the Python workers).
Rows are merged into bench/results/features.json by (engine, events size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path

from recsys.bench.common import apply_quick, loadavg, machine_info, positive_int, print_table, write_json

GOAL_EVENTS_PER_S = 2_000_000
SPARK_GOAL_RATIO = 3.0  # spark's time per event within 3x of polars' at 10M events
EVENTS_PER_USER = 10_628_527 / 1400  # the default workload: 1,400 users -> 10.6M events


def _tree_rss() -> int:
    """Resident bytes of this process and all its descendants."""
    page = os.sysconf("SC_PAGE_SIZE")
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/statm") as f:
                rss[int(d)] = int(f.read().split()[1]) * page
            parent[int(d)] = int(parts[1])
        except (OSError, IndexError, ValueError):
            continue
    me, total = os.getpid(), 0
    for pid, r in rss.items():
        p = pid
        while p and p != me:
            p = parent.get(p, 0)
        if p == me:
            total += r
    return total


class TreePeak:
    """Peak RSS growth (MB) of the process tree while the block runs (sampled every 50 ms)."""

    def __enter__(self) -> "TreePeak":
        self._base = self._peak = _tree_rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self._peak = max(self._peak, _tree_rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak_mb = (max(self._peak, _tree_rss()) - self._base) / 2**20


def _spark_startup_s(driver_memory: str) -> float:
    from features.spark.config import SparkConfig
    from features.spark.session import spark_session

    t = time.perf_counter()
    with spark_session(SparkConfig(driver_memory=driver_memory), "startup"):
        pass
    return time.perf_counter() - t


def _run_size(engine: str, users: int, args: argparse.Namespace, tmp: Path, startup: float | None) -> dict:
    from features.jobs import FeaturesConfig, build_features
    from features.sources import SyntheticConfig, generate_synthetic

    t0 = time.perf_counter()
    source, _ = generate_synthetic(SyntheticConfig(users=users, items=args.items, max_events=args.max_history, seed=0))
    events_file, items_file = tmp / f"events-{users}.parquet", tmp / f"items-{users}.parquet"
    if not events_file.exists():
        source.interactions.frame.collect().write_parquet(events_file)
        source.items.frame.collect().write_parquet(items_file)
    gen_s = time.perf_counter() - t0
    from features.spark.config import SparkConfig

    spark = SparkConfig(driver_memory=args.spark_driver_memory)
    cfg = FeaturesConfig(source="files", interactions=str(events_file), items=str(items_file), engine=engine, spark=spark)
    runs = []
    for i in range(args.repeats):
        with TreePeak() as mem:
            t = time.perf_counter()
            result = build_features(cfg, tmp / f"out-{engine}-{users}-{i}", force=True, log=lambda _m: None)
            secs = time.perf_counter() - t
        runs.append((secs, mem.peak_mb))
    events = result.manifest["outputs"]["interactions.parquet"]["rows"]
    runs.sort()
    secs, peak = runs[len(runs) // 2]
    t = time.perf_counter()  # the rerun of an unchanged input: the manifest check alone
    assert build_features(cfg, tmp / f"out-{engine}-{users}-0", log=lambda _m: None).skipped
    skip_s = time.perf_counter() - t
    row = {
        "engine": engine,
        "events": events,
        "users": users,
        "seconds": secs,
        "events_per_s": events / secs,
        "peak_mb": peak,
        "rerun_skip_s": skip_s,
        "generate_s": gen_s,
        "goal_events_per_s": GOAL_EVENTS_PER_S,
        "fingerprint": result.manifest["outputs"]["interactions.parquet"]["fingerprint"],
        "loadavg_1m": loadavg(),  # other processes' load: compare engines measured side by side only
    }
    if startup is not None:
        row["startup_s"] = startup
    return row


def _merge(path: Path, rows: list[dict]) -> list[dict]:
    """Earlier rows of other (engine, users) pairs are kept."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        data = {}
    old = data.get("rows", [])
    if "events" in data and not old:  # the one-row file of the polars-only bench
        old = [{"engine": "polars", **{k: v for k, v in data.items() if k not in ("machine", "quick")}}]
    new_keys = {(r["engine"], r["users"]) for r in rows}
    kept = [r for r in old if isinstance(r, dict) and (r.get("engine"), r.get("users")) not in new_keys]
    return sorted(kept + rows, key=lambda r: (r["events"], r["engine"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recsys.bench features", description=__doc__)
    p.add_argument("--engine", choices=["polars", "spark", "both"], default="polars")
    p.add_argument("--events", default="10", help="sizes in millions of events, comma-separated (e.g. 1,10,50)")
    p.add_argument("--users", type=positive_int, help="one size given as a number of users (overrides --events)")
    p.add_argument("--items", type=positive_int, default=20_000, help="synthetic catalogue size (default: %(default)s)")
    p.add_argument("--max-history", type=positive_int, default=20_000,
                   help="most events a synthetic user has (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed builds per engine and size; the median is reported")
    p.add_argument("--spark-driver-memory", default="4g",
                   help="JVM heap of the embedded Spark (the build's rows do not pass through it: 4g runs 50M events)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (tests)")
    p.add_argument("--out", default="bench/results", help="folder for features.json")
    args = p.parse_args(argv)
    try:
        millions = [float(e) for e in args.events.split(",")]
    except ValueError:
        p.error(f"--events {args.events!r}: comma-separated numbers of millions of events, e.g. 1,10,50")
    if any(not (m > 0 and math.isfinite(m)) for m in millions) or (args.users is not None and args.users < 1):
        p.error("--events and --users must be positive: a run of another size would be reported as this one")
    sizes = [args.users] if args.users else [max(1, round(m * 1e6 / EVENTS_PER_USER)) for m in millions]
    if args.quick:
        apply_quick(p, args, {"items": 200, "max_history": 500, "repeats": 1, "events": p.get_default("events"),
                              "users": p.get_default("users")})
        sizes = [20]
    engines = ["polars", "spark"] if args.engine == "both" else [args.engine]
    startup = _spark_startup_s(args.spark_driver_memory) if "spark" in engines else None

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for users in sizes:
            for engine in engines:
                rows.append(_run_size(engine, users, args, Path(tmp), startup if engine == "spark" else None))
    same = {r["users"]: {x["fingerprint"] for x in rows if x["users"] == r["users"]} for r in rows}
    cols = ["engine", "events", "seconds", "events_per_s", "peak_mb", "rerun_skip_s", "generate_s"]
    print_table(rows, cols + (["startup_s"] if startup is not None else []))
    for users, prints in same.items():
        if len(engines) > 1:
            print(f"users {users}: the engines' interactions.parquet are {'identical' if len(prints) == 1 else 'DIFFERENT'}")
    for r in rows:
        if r["engine"] == "polars" and r["events"] >= 10_000_000:
            verdict = "PASS" if r["events_per_s"] >= GOAL_EVENTS_PER_S else "MISS"
            print(f"polars goal >= {GOAL_EVENTS_PER_S / 1e6:.0f}M events/s at {r['events'] / 1e6:.1f}M: {verdict}")
    for r in rows:
        base = [x for x in rows if x["engine"] == "polars" and x["users"] == r["users"]]
        if r["engine"] == "spark" and base:
            ratio = r["seconds"] / base[0]["seconds"]
            r["ratio_to_polars"] = ratio
            print(f"spark/polars time at {r['events'] / 1e6:.1f}M events: {ratio:.1f}x (goal <= {SPARK_GOAL_RATIO:.0f}x)")
    for r in rows:
        fingerprint = r.pop("fingerprint")
        if len(engines) > 1:
            r["identical_to_other_engine"] = same[r["users"]] == {fingerprint}
    path = Path(args.out) / "features.json"
    # a full run merges its rows with earlier sizes; a smoke run's rows stand alone (never beside real ones)
    payload = {"machine": machine_info(), "quick": args.quick, "rows": rows if args.quick else _merge(path, rows)}
    print(f"wrote {write_json('features', payload, Path(args.out))}")
    if not args.quick:
        from recsys.plots import cost_vs_size

        # this run's rows only: merged rows from other runs ran under other loads
        print(f"wrote {cost_vs_size(rows, Path(args.out) / 'features_cost.png')}")
    if any(len(v) > 1 for v in same.values()):
        print("error: the engines' outputs differ")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
