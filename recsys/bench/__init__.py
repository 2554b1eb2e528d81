"""Benchmarks: `python -m recsys.bench NAME [options]`.

Each benchmark is a module `recsys.bench.NAME` exposing `main(argv) -> int`;
it prints a table and writes `bench/results/NAME.json`. Speed goals live here,
never in timed unit tests. Ratios are measured side by side in one run.
"""
