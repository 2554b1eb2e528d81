"""Structural rules of HOUSE_STYLE.md, checked on the source tree.

Imports follow the data flow recsys -> distill -> features; only
recsys/tracking/ imports mlflow; KeyedJaggedTensors are built in one place
per package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_import_direction():
    forbidden = {"features": ("recsys", "distill"), "distill": ("recsys",)}
    bad = []
    for package, banned in forbidden.items():
        for path, tree in _modules(package):
            for name in _imported(tree):
                if name.split(".")[0] in banned:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "imports must follow recsys -> distill -> features:\n" + "\n".join(bad)


def test_only_tracking_module_imports_mlflow():
    users = [
        str(path.relative_to(ROOT))
        for package in ("features", "distill", "recsys")
        for path, tree in _modules(package)
        if any(n.split(".")[0] == "mlflow" for n in _imported(tree))
    ]
    outside = [u for u in users if not u.startswith("recsys/tracking/")]
    assert not outside, f"only recsys/tracking/ may import mlflow: {outside}"


def test_keyed_jagged_tensors_built_in_one_place_per_package():
    builders = {}
    for package in ("recsys", "distill"):
        for path, tree in _modules(package):
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                    owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
                    if name == "KeyedJaggedTensor" or (owner == "KeyedJaggedTensor" and name.startswith("from_")):
                        builders.setdefault(package, set()).add(str(path.relative_to(ROOT)))
    for package, files in builders.items():
        assert len(files) == 1, f"{package}: KeyedJaggedTensors built in {sorted(files)}"


def test_kernel_is_the_bottom_of_the_import_graph():
    """features/core (errors, config loading, manifests, fingerprints, paths,
    the tracker protocol) imports no other part of the project."""
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path, tree in _modules("features/core")
        for name in _imported(tree)
        if name.split(".")[0] in ("recsys", "distill", "features") and not name.startswith("features.core")
    ]
    assert not bad, "features/core must not import the rest of the project:\n" + "\n".join(bad)


def test_match_file_and_prefix_declared_only_in_schemas():
    """`match_features.parquet` and the `mf_` prefix are spelled once, in
    features/schemas.py; every other module uses the constants."""
    literals = {"mf_", "match_features.parquet"}
    bad = [
        f"{path.relative_to(ROOT)}:{node.lineno} spells {node.value!r}"
        for package in ("features", "distill", "recsys")
        for path, tree in _modules(package)
        if path.relative_to(ROOT).as_posix() != "features/schemas.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in literals
    ]
    assert not bad, "use features.schemas.MATCH_FILE / MATCH_PREFIX:\n" + "\n".join(bad)


def _dotted_strings(tree: ast.AST) -> set[str]:
    """String constants that look like a module of the project: edges loaded
    by name (importlib.import_module, __import__, registries of names)."""
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.split(".")[0] in ("recsys", "features", "distill") and "." in node.value
            and all(part.isidentifier() for part in node.value.split(".")) and " " not in node.value}


def test_edges_loaded_by_name_follow_the_import_direction():
    forbidden = {"features": ("recsys", "distill"), "distill": ("recsys",)}
    bad = [
        f"{path.relative_to(ROOT)} names {name}"
        for package, banned in forbidden.items()
        for path, tree in _modules(package)
        for name in _dotted_strings(tree)
        if name.split(".")[0] in banned
    ]
    assert not bad, "a module loaded by name must follow recsys -> distill -> features too:\n" + "\n".join(bad)


def test_importlib_only_for_command_and_bench_dispatch():
    """Config sections are plain imports (no registry of names); only the CLI
    and the bench dispatch their subcommands by name, and the packages'
    __init__ resolve their public exports lazily (each name -> its module)."""
    users = []
    for package in ("features", "distill", "recsys"):
        for path, tree in _modules(package):
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                    if name in ("import_module", "__import__"):
                        users.append(path.relative_to(ROOT).as_posix())
    allowed = {"recsys/cli/__init__.py", "recsys/bench/__main__.py",  # subcommand dispatch
               "features/core/lazy.py"}  # the packages' lazy public exports
    assert set(users) <= allowed, users


def test_stage_jobs_are_run_through_the_stage_entry_points():
    """The CLI and the pipeline run a stage only through recsys/stages.py
    (which writes its manifest); benchmarks time the job functions directly."""
    jobs = {"build_features", "build_match_features", "train_ranker"}
    bad = []
    for path, tree in _modules("recsys"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("recsys/stages.py", "recsys/oof.py") or rel.startswith("recsys/bench/"):  # oof: run_match's out-of-fold path
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name in jobs:
                    bad.append(f"{rel}:{node.lineno} calls {name}")
    assert not bad, "run stages through recsys.stages:\n" + "\n".join(bad)


def test_no_module_over_450_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for package in ("features", "distill", "recsys")
            for p in (ROOT / package).rglob("*.py") if (n := len(p.read_text().splitlines())) > 450]
    assert not long, long

