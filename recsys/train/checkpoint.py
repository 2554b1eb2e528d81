"""Checkpoints of a training run and the key that decides whether to resume.

`checkpoint_dir` (default out_dir/checkpoints) holds `last.pt`, written after
every finished epoch (model, optimisers, epoch, early-stopping state), and
`best.pt` (model weights of the best epoch). Both are state dicts only, read
back with torch.load(weights_only=True) and written atomically (temp file,
then rename); a file that cannot be read is a DataError suggesting
--no-resume. Under DMP every rank writes its own `*.rank{r}of{w}.pt` holding
its local shards.

A run resumes from `last.pt` only when its key (`resume_key`: every setting
that changes what the run computes, plus the data spec and world size)
matches; otherwise it starts fresh and removes a stale `best.pt`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from features.core.config import config_hash, to_dict
from features.core.errors import DataError
from features.core.fingerprint import file_fingerprint
from features.core.manifest import atomic_file
from features.core.provenance import plugin_code
from recsys.data import RankingData
from recsys.config.sections import RankerConfig, TrainConfig
from recsys.train.distributed import Trainable, WorkerContext

# keys that do not change what a run computes: a resume may differ in them
RESUME_FREE = ("epochs", "resume", "progress", "checkpoint_dir", "device", "eval_batch_size", "num_threads")


def resume_key(ranker: RankerConfig, train: TrainConfig, seed: int, data: RankingData, world: int) -> str:
    t = {k: v for k, v in to_dict(train).items() if k not in RESUME_FREE}
    # the input files' bytes too: a finished checkpoint of the same config trained
    # on other match features or embeddings must not be taken for this run's model
    inputs = {k: file_fingerprint(p) for k, p in sorted(data.input_files.items())}
    # and the code: after a code change the stage reruns, and resuming a finished checkpoint of the old
    # code trained 0 epochs and reported the old model under the new key (a probe, 2026-12-01)
    return config_hash({"ranker": to_dict(ranker), "train": t, "data": to_dict(data.config), "seed": seed,
                        "spec": to_dict(data.spec), "world": world, "inputs": inputs,
                        "code": plugin_code().source_hash})


def checkpoint_name(stem: str, ctx: WorkerContext) -> str:
    return f"{stem}.pt" if not ctx.distributed else f"{stem}.rank{ctx.rank}of{ctx.world_size}.pt"


def _local(obj: Any) -> Any:
    """State (nested dicts/lists) with ShardedTensors replaced by their local shards."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(obj, ShardedTensor):
        return {"__local_shards__": [s.tensor.detach().clone() for s in obj.local_shards()]}
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_local(v) for v in obj)
    return obj


def _copy_local(live: Any, saved: Any) -> None:
    """In-place copy of a `_local` state into live state tensors (same structure)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(live, ShardedTensor):
        for shard, src in zip(live.local_shards(), saved["__local_shards__"], strict=True):
            shard.tensor.copy_(src)
    elif isinstance(live, Tensor):
        live.copy_(saved)
    elif isinstance(live, Mapping):
        for k, v in live.items():
            _copy_local(v, saved[k])
    elif isinstance(live, (list, tuple)):
        for a, b in zip(live, saved, strict=True):
            _copy_local(a, b)


def _model_state(tr: Trainable) -> dict[str, Any]:
    return _local(tr.module.state_dict())


def _load_model_state(tr: Trainable, state: Mapping[str, Any]) -> None:
    with torch.no_grad():
        _copy_local(tr.module.state_dict(), state)


def _save(path: Path, payload: Mapping[str, Any]) -> None:
    with atomic_file(path) as tmp:
        torch.save(dict(payload), tmp)


def _load(path: Path) -> dict[str, Any]:
    """A checkpoint written by `_save`; a file that is not one is a DataError
    (exit 1) suggesting --no-resume, not a pickle traceback."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a broken file
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
        raise _bad_checkpoint(path, f"cannot be read ({type(e).__name__}: {detail})") from e
    if not isinstance(ck, dict) or "model" not in ck:
        raise _bad_checkpoint(path, "is not a checkpoint of this trainer")
    return ck


def _bad_checkpoint(path: Path, what: str) -> DataError:
    return DataError(f"checkpoint {what}: rerun with --no-resume (or delete it) to train from scratch", file=str(path))


def save_last(path: Path, tr: Trainable, key: str, state: Mapping[str, Any]) -> None:
    """Everything a resumed run needs after a finished epoch."""
    _save(path, {
        "key": key,
        "model": _model_state(tr),
        "dense_opt": tr.dense_opt.state_dict(),
        "sparse_opt": _local(tr.sparse_opt.state_dict()),
        "state": json.dumps(state),
    })


def save_best(path: Path, tr: Trainable, epoch: int) -> None:
    _save(path, {"model": _model_state(tr), "epoch": epoch})


def load_best(path: Path, tr: Trainable) -> None:
    """Load best.pt's weights into `tr` (a mismatch is a DataError)."""
    try:
        _load_model_state(tr, _load(path)["model"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise _bad_checkpoint(path, f"does not match this model ({type(e).__name__})") from e


def _saved_epoch(ck: Mapping[str, Any]) -> int | None:
    """The epochs a checkpoint's loop state has run (None if unreadable: resume() then names the file)."""
    try:
        return int(json.loads(ck["state"])["epoch"])
    except (KeyError, ValueError, TypeError):
        return None


def _ranks_agree(epoch: int) -> bool:
    """Whether every rank passes the same `epoch` (-1: no checkpoint to resume)."""
    import torch.distributed as dist

    t = torch.tensor([epoch, -epoch], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == -int(t[1])


def resume(last_path: Path, best_path: Path, tr: Trainable, key: str, ctx: WorkerContext,
           enabled: bool, epochs: int) -> dict[str, Any] | None:
    """Restore `tr` from last.pt when `enabled`, its key matches and it is
    not past `epochs` (train.epochs, which the key leaves out so that a run
    can be extended), and return the loop state saved with it; otherwise
    remove a stale best.pt (never evaluate the best of an earlier run) and
    return None."""
    ck = _load(last_path) if enabled and last_path.exists() else None
    if ck is not None and ck.get("key") != key:
        print(f"checkpoint {last_path} is from another config; starting fresh", file=sys.stderr)
        ck = None
    done = _saved_epoch(ck) if ck is not None else None
    if done is not None and done > epochs:  # a model trained longer than asked: its numbers are not this run's
        if ctx.is_main:
            print(f"checkpoint {last_path} is past train.epochs ({done} > {epochs}); starting fresh", file=sys.stderr)
        ck = None
    if ctx.distributed and not _ranks_agree(-1 if ck is None or done is None else done):
        # a rank killed between two ranks' saves, or a deleted rank file: resuming some ranks and not others
        # trains them on different epochs, and the run hangs at the first collective that only some reach
        if ctx.is_main:
            print(f"the ranks' checkpoints ({last_path.parent}) are not all after the same epoch; starting fresh",
                  file=sys.stderr)
        ck = None
    if ck is None:
        best_path.unlink(missing_ok=True)
        return None
    try:
        _load_model_state(tr, ck["model"])
        tr.dense_opt.load_state_dict(ck["dense_opt"])
        if ctx.distributed:
            _copy_local(tr.sparse_opt.state_dict(), ck["sparse_opt"])
        else:
            tr.sparse_opt.load_state_dict(ck["sparse_opt"])
        state = json.loads(ck["state"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise _bad_checkpoint(last_path, f"does not match this model ({type(e).__name__})") from e
    if ctx.is_main:
        print(f"resumed from {last_path} after epoch {state['epoch']}", file=sys.stderr)
    return state
