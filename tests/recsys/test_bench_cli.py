"""`python -m recsys.bench` refuses what it cannot honour before any run
(2026-11-30: a file as --out failed after the whole run, with a traceback;
`all --engine polars` ran the features benchmark, then failed in attention;
`--events -1` ran a 1-user benchmark and reported it)."""

from __future__ import annotations

from recsys.bench.__main__ import main


def test_bench_refuses_before_running(tmp_path, capsys, monkeypatch):
    import recsys.bench.features as F

    ran = []
    monkeypatch.setattr(F, "_run_size", lambda *a, **k: ran.append(a))  # any run would be recorded
    (tmp_path / "afile").write_text("")
    assert main(["features", "--quick", "--out", str(tmp_path / "afile")]) == 2
    assert main(["all", "--engine", "polars"]) == 2
    assert "takes --quick and --out DIR only" in capsys.readouterr().err
    for bad in (["--events", "-1"], ["--events", "0"], ["--events", "abc"], ["--users", "0"]):
        try:
            rc = main(["features", *bad, "--out", str(tmp_path)])
        except SystemExit as e:  # argparse's usage error
            rc = e.code
        assert rc == 2, bad
    assert ran == []
    assert main(["all", "--help"]) == 0 and "all [--quick] [--out DIR]" in capsys.readouterr().out


def test_sizes_and_counts_below_one_and_missing_paths_are_usage_errors(tmp_path, capsys):
    """A probe (2026-12-01): `ranker --repeats 0` wrote NaN into ranker.json
    (exit 0); negative sizes ended in numpy tracebacks; a missing
    --checkpoint failed after the whole attention run."""
    bad = [["ranker", "--repeats", "0"], ["ranker", "--rank", "99", "--dim", "8"], ["ranker", "--requests", "0"],
           ["ranker", "--threads", "-1"], ["match", "--items", "-5"], ["match", "--cands", "0"],
           ["distill", "--repeats", "0"], ["distill", "--encode-items", "-1"], ["features", "--items", "0"],
           ["attention", "--checkpoint", str(tmp_path / "none.pt"), "--features", str(tmp_path)],
           ["attention", "--threads", "0"], ["attention", "--trained-epochs", "0"],
           # a probe (2026-12-01, second round): tracebacks, or nan written into the JSON with the guard off
           ["ranker", "--seed", "-5"], ["attention", "--seed", "-1"], ["features", "--events", "inf"],
           ["ranker", "--mem-budget-gb", "nan"], ["ranker", "--slow-s", "inf"], ["ranker", "--seed", str(2**64)]]
    for argv in bad:
        try:
            rc = main([*argv, "--out", str(tmp_path)])
        except SystemExit as e:  # argparse's usage error
            rc = e.code
        assert rc == 2, argv
    assert not list(tmp_path.glob("*.json"))
    (tmp_path / "f").write_text("")  # a file above --out: found before the run, not after it
    assert main(["match", "--quick", "--out", str(tmp_path / "f" / "x")]) == 2
    assert main(["match", "--quick", "--ou", str(tmp_path / "f" / "x")]) == 2  # argparse's abbreviation of --out


def test_a_quick_run_without_out_writes_beside_not_over_the_committed_results():
    import argparse
    from pathlib import Path

    from recsys.bench.common import RESULTS_DIR, quick_out

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    assert quick_out(p, RESULTS_DIR) == RESULTS_DIR / "quick"
    assert quick_out(p, Path("elsewhere")) == Path("elsewhere")
    q = argparse.ArgumentParser()
    q.add_argument("--out", default="bench/results")
    assert quick_out(q, "bench/results") == str(Path("bench/results") / "quick")


def test_ranker_quick_runs_on_one_thread(tmp_path, monkeypatch):
    """A misplaced --rank check (2026-12-01) had made `--quick`'s one thread dead code."""
    import recsys.bench.ranker as R

    seen = {}

    def stop(args):
        seen["threads"] = args.threads
        raise SystemExit(0)

    monkeypatch.setattr(R, "run", stop)
    monkeypatch.setattr(R.torch, "set_num_threads", lambda n: None)
    try:
        R.main(["--quick", "--out", str(tmp_path)])
    except SystemExit:
        pass
    assert seen == {"threads": 1}


def test_results_json_is_strict(tmp_path):
    """A NaN reaching a payload was written as the non-standard NaN token."""
    import json

    from recsys.bench.common import write_json

    path = write_json("x", {"a": float("nan"), "b": [1.0, float("inf")]}, tmp_path)
    assert json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c))) == {
        "a": None, "b": [1.0, None]}
