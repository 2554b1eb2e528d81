"""`python -m recsys.bench match --quick`: the smoke run writes the contract keys."""

from __future__ import annotations

import json
import math

from recsys.bench import match as bench


def test_quick_bench_writes_the_contract_keys(tmp_path, capsys):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "match.json").read_text())
    for key in ("pairs_per_s_1k", "pairs_per_s_10k", "speedup_vs_naive", "speedup_vs_pandas", "fraction_of_matmul"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    # the three implementations agreed on the subset they share
    assert all(r["max_abs_diff_vs_reference"] < 1e-5 for r in result["by_history"].values())
    text = capsys.readouterr().out
    assert "fraction_of_matmul" in text and ("PASS" in text or "MISS" in text)
