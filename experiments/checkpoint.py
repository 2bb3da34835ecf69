"""Atomic `orbax` checkpoints of a training run.

A checkpoint is a folder ``step_XXXXXXXX`` holding the arrays (orbax,
sharded), ``meta.json`` (step, data position, the leaves' key paths, anything
the caller adds) and ``MANIFEST.json`` (sha256 of every file). It is written
in a hidden temporary folder and renamed into place only when complete, so an
interrupted save never replaces or damages an earlier checkpoint; restoring
verifies the manifest first, so a damaged checkpoint gives a clear
`CheckpointError` instead of wrong numbers.

Trees are saved leaf by leaf (``params/00000``, ...) and restored into the
structure, dtypes and shardings of trees the caller builds the same way as
before (a fresh model and optimizer state), which keeps this independent of
the state classes. Typed PRNG keys are stored as their key data.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

__all__ = ["CheckpointError", "save", "restore", "read_arrays", "latest", "list_checkpoints"]

_PREFIX = "step_"
_MANIFEST = "MANIFEST.json"
_META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or from a different run."""


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flatten(trees: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    arrays, paths = {}, {}
    for name, tree in trees.items():
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        arrays[name] = {
            f"{i:05d}": (jax.random.key_data(x) if _is_key(x) else x)
            for i, (_, x) in enumerate(leaves)
        }
        paths[name] = [jax.tree_util.keystr(p) for p, _ in leaves]
    return arrays, paths


def _abstract(x):
    sharding = getattr(x, "sharding", None)
    if _is_key(x):
        data = jax.eval_shape(jax.random.key_data, x)
        if sharding is not None and hasattr(sharding, "spec"):
            spec = jax.sharding.PartitionSpec(*sharding.spec, None)
            sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != _MANIFEST)


def list_checkpoints(directory: str | os.PathLike) -> list[pathlib.Path]:
    """Complete checkpoint folders in ``directory``, oldest first."""
    d = pathlib.Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest(directory: str | os.PathLike) -> pathlib.Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save(
    directory: str | os.PathLike,
    step: int,
    trees: dict[str, Any],
    meta: dict[str, Any],
    *,
    keep: int = 2,
) -> pathlib.Path:
    """Writes checkpoint ``step`` of ``trees`` (e.g. params, opt_state, rng) atomically.

    Args:
      directory: the run's checkpoint folder (created if needed).
      step: the number of completed optimizer steps.
      trees: ``{name: pytree of arrays}``.
      meta: JSON-serializable extras (data position, config, ...).
      keep: how many most recent checkpoints to keep.

    Returns:
      The checkpoint folder.
    """
    import orbax.checkpoint as ocp

    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"{_PREFIX}{step:08d}"
    tmp = d / f".tmp-{final.name}"
    if jax.process_index() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier("ckpt-clean")
    arrays, paths = _flatten(trees)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(tmp / "arrays", args=ocp.args.StandardSave(arrays))
    if jax.process_index() == 0:
        (tmp / _META).write_text(json.dumps({**meta, "step": step, "leaf_paths": paths}))
        manifest = {p.relative_to(tmp).as_posix(): _sha256(p) for p in _files(tmp)}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=0))
        if final.exists():  # re-saving a step: move the old one aside first
            old = d / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        for stale in list_checkpoints(d)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale)
    _barrier("ckpt-done")
    return final


def _verify(path: pathlib.Path) -> dict[str, Any]:
    mpath = path / _MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete: {_MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable {_MANIFEST} ({e})") from e
    present = {p.relative_to(path).as_posix() for p in _files(path)}
    missing = sorted(set(manifest) - present)
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing files {missing[:5]}")
    bad = [f for f, h in manifest.items() if _sha256(path / f) != h]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: sha256 mismatch in {bad[:5]}; delete it to resume "
            "from an earlier one"
        )
    return json.loads((path / _META).read_text())


def restore(
    directory: str | os.PathLike, like: dict[str, Any], *, path: str | os.PathLike | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores the latest checkpoint in ``directory`` into the structure of ``like``.

    Args:
      directory: the run's checkpoint folder.
      like: ``{name: pytree}`` built exactly as for the saved run (values are
        ignored; structure, dtypes and shardings are used).
      path: a specific checkpoint folder instead of the latest.

    Returns:
      ``(trees, meta)``.

    Raises:
      CheckpointError: no checkpoint, incomplete or corrupt files, or trees
        whose structure differs from the saved ones (another model/optimizer).
    """
    import orbax.checkpoint as ocp

    ckpt = pathlib.Path(path) if path is not None else latest(directory)
    if ckpt is None or not ckpt.is_dir():
        raise CheckpointError(
            f"no checkpoint to resume from in {directory} (expected folders {_PREFIX}XXXXXXXX); "
            "run without --resume to start from scratch"
        )
    meta = _verify(ckpt)
    _, paths = _flatten(like)
    if paths != meta.get("leaf_paths"):
        saved = meta.get("leaf_paths", {})
        diff = {
            k: (len(saved.get(k, [])), len(paths[k])) for k in paths if saved.get(k) != paths[k]
        }
        raise CheckpointError(
            f"checkpoint {ckpt} holds different trees than this run (saved vs current leaf "
            f"counts {diff}): it was written for another model, optimizer or config"
        )
    abstract = {
        name: {f"{i:05d}": _abstract(x) for i, x in enumerate(jax.tree.leaves(tree))}
        for name, tree in like.items()
    }
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            arrays = ckptr.restore(ckpt / "arrays", args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for damaged data
        raise CheckpointError(
            f"checkpoint {ckpt} could not be read: {type(e).__name__}: {e}"
        ) from e
    out = {}
    for name, tree in like.items():
        leaves, treedef = jax.tree.flatten(tree)
        restored = []
        for i, x in enumerate(leaves):
            y = arrays[name][f"{i:05d}"]
            if _is_key(x):
                y = jax.random.wrap_key_data(y, impl=jax.random.key_impl(x))
            elif isinstance(x, np.ndarray):
                y = np.asarray(y)
            restored.append(y)
        out[name] = jax.tree.unflatten(treedef, restored)
    return out, meta


def read_arrays(path: str | os.PathLike) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
    """Every saved leaf of checkpoint folder ``path`` as host NumPy arrays (verified first).

    Needs neither the model nor the optimizer: for inspecting and comparing
    checkpoints. Typed PRNG keys come back as their uint32 key data.

    Returns:
      ``({name: [leaf, ...]}, meta)``, leaves in the saved order (see
      ``meta["leaf_paths"]``).
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    meta = _verify(path)
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            tree = ckptr.metadata(path / "arrays").item_metadata.tree
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            arrays = ckptr.restore(path / "arrays", args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:
        msg = f"checkpoint {path} could not be read: {type(e).__name__}: {e}"
        raise CheckpointError(msg) from e
    return {name: [d[k] for k in sorted(d)] for name, d in arrays.items()}, meta
