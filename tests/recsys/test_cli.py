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
