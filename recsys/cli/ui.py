"""`recsys ui`: the MLflow UI over the project's embedded tracking store."""

from __future__ import annotations

import argparse

from recsys.cli import command

UI_EPILOG = """\
examples:
  recsys ui                                   # the default store: ./mlflow/mlflow.db, on http://127.0.0.1:5000
  recsys ui --port 5001
  recsys ui --store sqlite:///$PWD/runs/mlflow.db
  recsys ui --config experiments/configs/base.yaml   # uses its `tracking:` section

Store precedence: --store > the config's tracking.uri > MLFLOW_TRACKING_URI >
sqlite:///<cwd>/mlflow/mlflow.db. Runs `mlflow server` with one worker bound to
--host (default 127.0.0.1: this machine only); Ctrl-C or SIGTERM stops it, and
so does the death of this command by any signal (the server never outlives it).
The server has NO authentication: any other --host is warned about loudly.
Pipelines can log through it: MLFLOW_TRACKING_URI=http://127.0.0.1:PORT.
"""


def _tracking_config(args: argparse.Namespace):
    import dataclasses

    from features.core.config import load_mapping
    from recsys.config import PipelineConfig
    from recsys.tracking.config import TrackingConfig

    cfg = TrackingConfig()
    if args.config:  # checked whole, as every command does: a misspelt `trackng:` served ./mlflow (a probe)
        cfg = PipelineConfig.from_mapping(load_mapping(args.config), where=str(args.config)).tracking
    over = {"uri": args.store, "artifact_root": args.artifact_root}
    return dataclasses.replace(cfg, **{k: v for k, v in over.items() if v})


def _ui(args: argparse.Namespace) -> int:
    from features.core.errors import UsageError
    from recsys.tracking import serve

    if not args.ready_timeout > 0:
        raise UsageError(f"--ready-timeout {args.ready_timeout}: must be a positive number of seconds")
    return serve(_tracking_config(args), host=args.host, port=args.port, ready_timeout=args.ready_timeout,
                 uri_source="--store" if args.store else None)


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "ui",
        help="serve the MLflow UI over the tracking store (runs, metrics, figures, artifacts)",
        description="Serve the MLflow UI (and tracking REST API) over the project's tracking store.",
        epilog=UI_EPILOG,
    )
    p.add_argument("--port", type=int, default=5000, help="port to listen on, 1..65535 (default 5000)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: local only)")
    p.add_argument("--store", help="tracking store URI, e.g. sqlite:///path/mlflow.db (default: see below)")
    p.add_argument("--artifact-root", help="artifact folder for new experiments (default: <store folder>/artifacts)")
    p.add_argument("--config", help="pipeline YAML/JSON whose `tracking:` section names the store")
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for the server (default 60)")
    p.set_defaults(handler=_ui)
