"""The `recsys` entry point: every command has --help; exit statuses."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from recsys.cli import build_parser, main


def _leaf_commands(parser: argparse.ArgumentParser, prefix=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix
        return
    for name, child in subs[0].choices.items():
        yield from _leaf_commands(child, (*prefix, name))


def test_every_command_has_help(capsys):
    commands = list(_leaf_commands(build_parser()))
    assert ("features", "build") in commands and ("data", "describe") in commands
    for cmd in commands:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0, cmd
        out = capsys.readouterr().out
        assert "usage: recsys " + " ".join(cmd) in out


def test_every_group_help_shows_examples(capsys):
    """The group pages (`recsys features --help`) had none (found 2026-11-30)."""
    parser = build_parser()
    groups = [name for name, child in next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.items()
              if any(isinstance(a, argparse._SubParsersAction) for a in child._actions)]
    assert "features" in groups and "experiment" in groups
    for name in groups:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        assert "examples" in out and f"recsys {name} " in out.split("examples", 1)[1], name


def test_bare_group_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert main(["features"]) == 2
    assert "build" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "recsys.cli", "--help"], capture_output=True, text=True, check=True)
    assert "features" in out.stdout


def test_tracking_reuse_false_recomputes_in_the_distill_and_match_commands(tmp_path, monkeypatch):
    """A probe (2026-12-01): `tracking.reuse: false` ("always recompute, like
    --force") was honoured by `experiment run` and `rank train` only; teachers
    fit, distill train / eval and features match skipped as up to date."""
    import distill.jobs
    import recsys.stages

    (tmp_path / "features").mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tracking:\n  reuse: false\n  enabled: false\n")
    seen = []

    class Stop(Exception):
        pass

    def spy(*_a, force, **_k):
        seen.append(force)
        raise Stop

    for name in ("fit_teachers", "train_student", "evaluate_seeds"):
        monkeypatch.setattr(distill.jobs, name, spy)
    monkeypatch.setattr(recsys.stages, "run_distill", spy)
    feats = str(tmp_path / "features")
    for argv in (["teachers", "fit"], ["distill", "train"], ["distill", "eval"], ["distill", "eval", "--seeds", "0,1"]):
        main([*argv, "--config", str(cfg), "--features", feats, "--out", str(tmp_path / "out")])  # stopped by the spy
    monkeypatch.setattr(recsys.stages, "run_match", spy)
    (tmp_path / "emb.parquet").write_bytes(b"")
    main(["features", "match", "--config", str(cfg), "--features", feats, "--embeddings", str(tmp_path / "emb.parquet"),
          "--out", str(tmp_path / "match")])
    assert seen == [True, True, True, True, True]


def test_torch_allocator_failure_reads_as_out_of_memory_with_the_keys_to_lower():
    from recsys.cli import describe_exception

    e = RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 3208000000 bytes. Error code 12 (Cannot allocate memory)")
    msg = describe_exception(e)
    assert msg.startswith("out of memory (one tensor of 3.0 GiB)")
    assert "train.eval_batch_size" in msg and "data.history_cap" in msg
    assert describe_exception(RuntimeError("boom")) == "unexpected RuntimeError: boom"
