"""Shard optimizer state like the parameter it belongs to.

`optax.tree_map_params` only handles states that hold whole copies of the
params tree; ours also hold factored (CAME row/column statistics), low-rank
(APOLLO moments) and scalar per-leaf states. `state_shardings` assigns every
state leaf the sharding of its parameter on the axes it keeps:

* a state leaf is matched to a parameter when the parameter's key path is a
  contiguous part of the state leaf's key path (the longest match wins);
* same shape as the parameter: the parameter's `PartitionSpec`;
* same rank: the parameter's mesh axis on every axis whose size is unchanged
  (the low-rank axis of an APOLLO moment is replicated);
* one axis fewer (a factored row/column statistic): the parameter's spec with
  the reduced axis removed;
* anything else (counters, keys, norms): replicated.

A mesh axis is kept only when it divides the state leaf's dimension.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from optim_transforms.matrix import path_names

__all__ = ["state_shardings", "init_sharded"]


def _names(path) -> tuple[str, ...]:
    s = path_names(path)
    return tuple(s.split("/")) if s else ()


def _find(sub: tuple[str, ...], full: tuple[str, ...]) -> bool:
    n = len(sub)
    return any(full[i : i + n] == sub for i in range(len(full) - n + 1))


def _axis_size(mesh, entry) -> int:
    if entry is None:
        return 1
    entries = entry if isinstance(entry, tuple) else (entry,)
    size = 1
    for e in entries:
        size *= mesh.shape[e]
    return size


def _spec_for(shape, pshape, pspec, mesh) -> PartitionSpec:
    spec = tuple(pspec) + (None,) * (len(pshape) - len(pspec))
    if len(shape) == len(pshape):
        kept = [e if d == pd else None for d, pd, e in zip(shape, pshape, spec, strict=True)]
    elif len(shape) == len(pshape) - 1:
        kept = None
        for drop in reversed(range(len(pshape))):
            if tuple(pshape[:drop] + pshape[drop + 1 :]) == tuple(shape):
                kept = list(spec[:drop] + spec[drop + 1 :])
                break
        if kept is None:
            return PartitionSpec()
    else:
        return PartitionSpec()
    kept = [
        e if e is not None and d % _axis_size(mesh, e) == 0 else None
        for d, e in zip(shape, kept, strict=True)
    ]
    # A mesh axis whose param axis was reduced away (e.g. the fsdp axis of an
    # APOLLO moment's rank axis) moves to the largest free axis it divides, so
    # the state stays split as many ways as its param instead of replicated.
    used = {a for e in kept if e is not None for a in (e if isinstance(e, tuple) else (e,))}
    lost = [
        a
        for e in spec
        if e is not None
        for a in (e if isinstance(e, tuple) else (e,))
        if a not in used
    ]
    for a in lost:
        free = [
            i
            for i, e in enumerate(kept)
            if e is None and shape[i] > 1 and shape[i] % mesh.shape[a] == 0
        ]
        if free:
            kept[max(free, key=lambda i: shape[i])] = a
    return PartitionSpec(*kept)


def state_shardings(tx, params: Any, param_shardings: Any, mesh) -> Any:
    """`NamedSharding`s for ``tx.init(params)``, following each leaf's param.

    Args:
      tx: an `optax.GradientTransformation`.
      params: params or their `jax.ShapeDtypeStruct`s.
      param_shardings: a tree like ``params`` of `NamedSharding`s.
      mesh: the `jax.sharding.Mesh`.

    Returns:
      A tree like the optimizer state whose leaves are `NamedSharding`s.
    """
    abstract = jax.eval_shape(tx.init, params)
    pleaves = jax.tree_util.tree_leaves_with_path(params)
    sleaves = jax.tree.leaves(param_shardings)
    table = [
        (_names(p), tuple(x.shape), s.spec) for (p, x), s in zip(pleaves, sleaves, strict=True)
    ]
    table.sort(key=lambda t: -len(t[0]))

    def leaf(path, x):
        names = _names(path)
        for pnames, pshape, pspec in table:
            if pnames and _find(pnames, names):
                return NamedSharding(mesh, _spec_for(tuple(x.shape), pshape, pspec, mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def init_sharded(tx, params: Any, mesh) -> Any:
    """``tx.init(params)`` with every state leaf sharded by `state_shardings`."""
    pshard = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(tx.init, out_shardings=state_shardings(tx, params, pshard, mesh))(params)
