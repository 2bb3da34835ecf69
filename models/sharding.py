"""Mesh, logical axis rules and sharded creation of the LLaMA.

`LOGICAL_AXIS_RULES` is the one place where sharding is defined: every
parameter of `models.llama` carries logical axis names (``out_sharding``
metadata) and every activation constraint uses logical names; this table maps
them to the axes of a ``('data', 'fsdp', 'tensor')`` mesh:

* ``data``: pure data parallelism (params replicated along it);
* ``fsdp``: data parallelism with params and optimizer state sharded on their
  ``embed`` axis (ZeRO-3 style);
* ``tensor``: Megatron-style tensor parallelism on the ``mlp`` / ``heads`` /
  ``kv`` / ``vocab`` axes.

A mesh axis that does not divide a dimension is dropped for that array (it is
replicated along that mesh axis instead), so any config runs on any mesh.
Optimizer state follows its parameter (`opt_state_shardings`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from optim_transforms.sharding import state_shardings

__all__ = [
    "MESH_AXES",
    "LOGICAL_AXIS_RULES",
    "make_mesh",
    "logical_to_spec",
    "constrain",
    "param_shardings",
    "create_model",
    "abstract_params",
    "opt_state_shardings",
    "batch_sharding",
    "bytes_per_device",
]

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with `AxisType.Auto` axes.

    Args:
      data, fsdp, tensor: mesh axis sizes; their product is the device count.
      devices: the devices to use (default: the first ``data*fsdp*tensor`` of
        `jax.devices()`, which spans all processes in a multi-host run).
    """
    n = data * fsdp * tensor
    if devices is None:
        devices = jax.devices()[:n]
    if len(devices) != n:
        raise ValueError(f"make_mesh: {data}x{fsdp}x{tensor} needs {n} devices, got {len(devices)}")
    arr = np.asarray(devices, dtype=object).reshape(data, fsdp, tensor)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)


def logical_to_spec(names, shape=None, mesh=None) -> PartitionSpec:
    """Resolves logical axis names to a `PartitionSpec` with `LOGICAL_AXIS_RULES`.

    Args:
      names: a tuple of logical names (or None) per array axis.
      shape: the array shape; with ``mesh``, a mesh axis that does not divide
        its dimension (or is absent from the mesh) is dropped.
      mesh: a `Mesh` or `AbstractMesh`.
    """
    rules = dict(LOGICAL_AXIS_RULES)
    sizes = _mesh_sizes(mesh) if mesh is not None else None
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        axes = rules.get(name) if name is not None else None
        axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        kept = []
        for a in axes:
            if a in used or (sizes is not None and a not in sizes):
                continue
            if sizes is not None and shape is not None:
                div = math.prod(sizes[k] for k in kept) * sizes[a]
                if shape[i] % div:
                    continue
            kept.append(a)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def constrain(x: jax.Array, names) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """`NamedSharding` per variable of ``params`` (an `nnx.State`) from its logical names.

    Returns a tree with the structure of ``params`` (variables hold shardings).
    """

    def leaf(v):
        value = v.get_value()
        names = v.get_metadata("out_sharding", None) or (None,) * len(value.shape)
        return v.copy(NamedSharding(mesh, logical_to_spec(names, value.shape, mesh)))

    return jax.tree.map(leaf, params, is_leaf=_is_var)


def _abstract_model(config, mesh: Mesh, seed: int):
    from models.llama import Llama

    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed)))


def create_model(config, mesh: Mesh, *, seed: int = 0):
    """A `Llama` whose parameters are created sharded on ``mesh``.

    The parameters are computed inside one `jax.jit` with the rules' shardings
    as ``out_shardings``: no device ever holds an unsharded copy.
    """
    from models.llama import Llama

    graphdef, abstract_state = nnx.split(_abstract_model(config, mesh, seed))
    shardings = param_shardings(abstract_state, mesh)

    def make():
        return nnx.state(Llama(config, rngs=nnx.Rngs(seed)))

    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        state = jax.jit(make, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_params(config, mesh: Mesh) -> Any:
    """The param `nnx.State` as `jax.ShapeDtypeStruct`s with `NamedSharding`s (no allocation)."""
    _, abstract = nnx.split(_abstract_model(config, mesh, 0), nnx.Param)
    shardings = param_shardings(abstract, mesh)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def opt_state_shardings(tx, params: Any, mesh: Mesh) -> Any:
    """`NamedSharding`s for ``tx.init(params)``: each state leaf follows its param.

    ``params`` are arrays or `jax.ShapeDtypeStruct`s that carry shardings.
    Built on `optim_transforms.sharding.state_shardings`.
    """
    pshard = jax.tree.map(lambda x: x.sharding, params)
    return state_shardings(tx, params, pshard, mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of an ``[B, T]`` batch array: ``B`` over ``('data', 'fsdp')``."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length")))


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds for ``tree`` (arrays or sharded `ShapeDtypeStruct`s).

    Uses the sharding's shard shape, so it needs no allocation. For arrays
    spread over several processes it is the size on device 0 of the mesh.
    """
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total
