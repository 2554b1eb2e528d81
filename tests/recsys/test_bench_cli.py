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
