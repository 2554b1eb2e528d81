"""Distill fixtures: one encoder cache and one small end-to-end run per session.

MiniLM loads once per process and the synthetic catalog (400 short texts) is
encoded once into a session cache; every test that needs text vectors reads
them from there. The end-to-end run (`recsys distill eval` on the synthetic
features, few epochs) is shared by the CLI-contract and planted-truth tests.
"""

from __future__ import annotations

import argparse
import json

import polars as pl
import pytest

SMALL = {
    "seed": 0,
    "teachers": {"id2item": {"epochs": 4, "patience": 0}, "seq2item": {"epochs": 4, "patience": 0}},
    "distill": {"epochs": 4, "patience": 0, "batch_size": 128, "progress": False},
}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The jobs train on one thread (DistillConfig.threads); do the same in
    direct library calls: on a shared 2-core machine two OpenMP threads are
    several times slower for these tiny models."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def encoder_cache(tmp_path_factory):
    """A session-wide encoder cache folder (also exported as RECSYS_CACHE_DIR
    for the CLI runs, which take no cache flag)."""
    return tmp_path_factory.mktemp("encoder_cache")


@pytest.fixture(scope="session")
def syn_content(synthetic_features, encoder_cache):
    """ContentFeatures of the synthetic catalog (texts encoded once, cached)."""
    from distill.encoders import build_content

    items = pl.read_parquet(synthetic_features / "items.parquet")
    kinds = json.loads((synthetic_features / "manifest.json").read_text())["item_fields"]
    return build_content(items, kinds, cache_dir=encoder_cache / "encoders", progress=False)


@pytest.fixture(scope="session")
def syn_data(synthetic_features):
    from distill.evaluate import prepare_cold_start

    f = synthetic_features
    return prepare_cold_start(
        pl.read_parquet(f / "interactions.parquet"),
        pl.read_parquet(f / "sequences.parquet"),
        pl.read_parquet(f / "items.parquet"),
        holdout_frac=0.2,
        seed=0,
    )


def run_cli(argv: list[str]) -> int:
    """Our `register` on a fresh parser, dispatched like `recsys.cli.main`
    (the lead adds the module to COMMAND_MODULES)."""
    from features.core.errors import RecsysError
    from recsys.cli import distill as cli_distill

    parser = argparse.ArgumentParser(prog="recsys")
    cli_distill.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except RecsysError as e:
        print(f"error: {e}")
        return e.exit_code


@pytest.fixture(scope="session")
def small_config(tmp_path_factory):
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


@pytest.fixture(scope="session")
def syn_eval(synthetic_features, small_config, encoder_cache, syn_content, tmp_path_factory):
    """`recsys distill eval` on the synthetic features with the small config."""
    import os

    out = tmp_path_factory.mktemp("distill") / "out"
    old = os.environ.get("RECSYS_CACHE_DIR")
    os.environ["RECSYS_CACHE_DIR"] = str(encoder_cache)
    try:
        rc = run_cli(["distill", "eval", "--features", str(synthetic_features), "--out", str(out), "--config", str(small_config), "--quiet"])
    finally:
        if old is None:
            os.environ.pop("RECSYS_CACHE_DIR")
        else:
            os.environ["RECSYS_CACHE_DIR"] = old
    assert rc == 0
    return out
