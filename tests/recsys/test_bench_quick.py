"""`python -m recsys.bench NAME --quick` sets its own sizes: an option it sets,
given as well, is a usage error (it was silently overridden, and the JSON
recorded the quick value)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(("bench", "flag"), [
    ("ranker", ["--requests", "2"]), ("match", ["--repeats", "2"]), ("features", ["--events", "1"]),
    ("distill", ["--epochs", "3"]),
])
def test_quick_refuses_an_option_it_sets(tmp_path, capsys, bench, flag):
    import importlib

    mod = importlib.import_module(f"recsys.bench.{bench}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--quick", *flag, "--out", str(tmp_path)])
    assert e.value.code == 2 and f"--quick sets {flag[0]} itself" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
