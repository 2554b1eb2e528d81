"""Dispatch `python -m recsys.bench NAME [args]` to `recsys.bench.NAME.main`."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCHMARKS = {
    "features": "feature jobs on >=10M synthetic events: events/s, peak memory",
    "attention": "SVD-attention vs exact target attention: ms/user, speedup, error",
    "match": "match-feature job: pairs/s, speedup vs naive and pandas, fraction of matmul",
    "distill": "student training samples/s and item encoding items/s",
    "ranker": "TorchRec ranker training samples/s per history encoder",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: python -m recsys.bench {all|" + "|".join(BENCHMARKS) + "} [options]\n")
        for name, what in BENCHMARKS.items():
            print(f"  {name:<10} {what}")
        print("\nEach writes bench/results/NAME.json; `NAME --help` lists its options.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "all" and any(a in {"-h", "--help"} for a in rest):
        print("usage: python -m recsys.bench all [--quick] [--out DIR]\n\nRuns every benchmark in turn with these "
              "two options; run a benchmark by name for its own options.")
        return 0
    if name == "all":  # one set of options for every benchmark: only those they all take, checked before any run
        extra = [a for i, a in enumerate(rest) if a != "--quick" and not a.startswith("--out")
                 and not (i and rest[i - 1] == "--out")]
        if extra:
            print(f"error: bench all takes --quick and --out DIR only (got {' '.join(extra)}); "
                  "run a benchmark by name for its options", file=sys.stderr)
            return 2
    def is_out(flag: str) -> bool:  # --out, or an abbreviation argparse would take for it (--ou)
        return len(flag) > 3 and "--out".startswith(flag)

    out = next((a.split("=", 1)[1] for a in rest if "=" in a and is_out(a.split("=", 1)[0])), None) or next(
        (rest[i + 1] for i, a in enumerate(rest[:-1]) if is_out(a)), None)
    # found before the run, not after it: --out itself, or a folder above it, an existing file
    blocked = next((p for p in (Path(out), *Path(out).parents) if p.exists() and not p.is_dir()), None) if out else None
    if blocked is not None:
        what = "is an existing file" if blocked == Path(out) else f"lies under {blocked}, an existing file"
        print(f"error: --out {out} {what}; expected a folder for the results JSON", file=sys.stderr)
        return 2
    names = list(BENCHMARKS) if name == "all" else [name]
    for n in names:
        if n not in BENCHMARKS:
            print(f"error: unknown benchmark {n!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        module = importlib.import_module(f"recsys.bench.{n}")
        try:
            rc = module.main(rest)
        except KeyboardInterrupt:  # results files are written atomically: the previous one stays
            print(f"interrupted: {n} stopped; its previous {n}.json, if any, is unchanged", file=sys.stderr)
            return 130
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
