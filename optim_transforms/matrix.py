"""Matrix view of n-D parameters and parameter-group labels.

Matrix optimizers (SWAN, APOLLO) act on each weight as a batch of matrices.
A `MatrixDims` spec says which axes of a leaf are the fan-in ("reduction")
axes and which are the fan-out ("output") axes; every other axis is a batch
axis (e.g. the leading layer axis of `nnx.scan`-stacked layers), handled with
`jax.vmap`.

The internal view is always the PyTorch one, ``(batch, out, in)``: a Flax
``Dense`` kernel ``(in, out)`` has ``reduction_axes=(0,)`` and
``output_axes=(1,)`` and is transposed into ``(1, out, in)``. Functions passed
to `map_matrices` therefore receive ``G`` with ``m = out`` rows and ``n = in``
columns, matching the formulas in ALGORITHMS.md.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "MatrixDims",
    "default_matrix_dims",
    "matrix_dims_tree",
    "to_matrix",
    "from_matrix",
    "map_matrices",
    "path_names",
    "matrix_labels",
    "partition_matrices",
    "EXCLUDE_FROM_MATRIX",
]


class MatrixDims(NamedTuple):
    """Which axes of a leaf are fan-in (reduction) and fan-out (output).

    All other axes are batch axes. Axes are non-negative indices into the
    leaf's shape. Mirrors `optax.contrib.MuonDimensionNumbers`.
    """

    reduction_axes: tuple[int, ...] = (0,)
    output_axes: tuple[int, ...] = (1,)


# Leaves whose path matches this go to the element-wise fallback by default
# (GaLore-benchmark practice: embeddings and LM head stay on AdamW).
EXCLUDE_FROM_MATRIX = r"(^|/)(embed\w*|embedding|wte|wpe|lm_head|unembed\w*)(/|$)"

_QKV = re.compile(r"(^|/)(q_proj|k_proj|v_proj|query|key|value|qkv)(/|$)")
_OUT = re.compile(r"(^|/)(o_proj|out_proj|out)(/|$)")
_STACK_KEYS = ("layers", "blocks", "scan")
_warned: set[str] = set()


def path_names(path: tuple[Any, ...]) -> str:
    """Turns a `jax.tree_util` key path into ``'a/b/0/kernel'``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _num_stacked_axes(names: list[str]) -> int:
    """1 if the path goes through a scanned stack (``layers/<name>``), else 0.

    `nnx.List` of layers gives integer keys (``layers/0/...``): not stacked.
    `nnx.scan`/`nnx.vmap`-stacked layers give ``layers/attn/...``: stacked.
    """
    for i, n in enumerate(names[:-1]):
        if n in _STACK_KEYS and not names[i + 1].isdigit():
            return 1
    return 0


def default_matrix_dims(path: tuple[Any, ...] | str, shape: tuple[int, ...]) -> MatrixDims | None:
    """The default `MatrixDims` of a leaf from its path and shape, or None.

    Rules (Flax layout; see ALGORITHMS.md §0.2):

    * ``ndim < 2``: None (not a matrix).
    * a leaf under a scanned stack (``.../layers/<not an int>/...``) gets a
      leading batch axis; the rest follows the rules below.
    * 2 matrix axes: ``reduction=(0,), output=(1,)`` (Dense ``(in, out)``).
    * 3 matrix axes under ``q_proj|k_proj|v_proj|query|key|value``:
      ``(d, heads, head_dim)`` -> ``reduction=(0,), output=(1, 2)``.
    * 3 matrix axes under ``o_proj|out_proj|out``: ``(heads, head_dim, d)``
      -> ``reduction=(0, 1), output=(2,)``.
    * anything else of higher rank: None, with a one-time warning naming it.
    """
    name = path if isinstance(path, str) else path_names(path)
    ndim = len(shape)
    if ndim < 2:
        return None
    names = name.split("/")
    b = _num_stacked_axes(names)
    core = ndim - b
    if core < 2:  # e.g. a scanned norm scale (L, d)
        return None
    if core == 2:
        return MatrixDims((b,), (b + 1,))
    if core == 3 and _QKV.search(name):
        return MatrixDims((b,), (b + 1, b + 2))
    if core == 3 and _OUT.search(name):
        return MatrixDims((b, b + 1), (b + 2,))
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"optim_transforms: no matrix view for leaf {name!r} of shape {shape}; "
            "it is treated element-wise. Pass explicit `dims` to change that.",
            stacklevel=3,
        )
    return None


DimsSpec = MatrixDims | Callable[[tuple[Any, ...], tuple[int, ...]], MatrixDims | None] | Any | None


def matrix_dims_tree(tree: Any, dims: DimsSpec = None) -> Any:
    """A tree (prefix-compatible with ``tree``) of `MatrixDims` or None per leaf.

    Args:
      tree: params or updates (may contain `optax.MaskedNode`s).
      dims: None (use `default_matrix_dims`), a single `MatrixDims` for every
        leaf of rank >= 2, a callable ``(path, shape) -> MatrixDims | None``,
        or a pytree with the structure of ``tree`` holding MatrixDims/None.

    Returns:
      A pytree with the structure of ``tree`` whose leaves are `MatrixDims` or
      None (None leaves are kept by using `is_leaf`).
    """
    if dims is None or callable(dims) and not isinstance(dims, MatrixDims):
        fn = dims or default_matrix_dims

        def leaf_dims(path, x):
            if isinstance(x, optax.MaskedNode) or not hasattr(x, "shape"):
                return None
            return fn(path, tuple(x.shape))

        return jax.tree_util.tree_map_with_path(
            leaf_dims, tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
        )
    if isinstance(dims, MatrixDims):
        return jax.tree.map(
            lambda x: dims if getattr(x, "ndim", 0) >= 2 else None,
            tree,
            is_leaf=lambda x: isinstance(x, optax.MaskedNode),
        )
    return dims


def _check_dims(shape: tuple[int, ...], dims: MatrixDims) -> None:
    axes = tuple(dims.reduction_axes) + tuple(dims.output_axes)
    if len(set(axes)) != len(axes) or any(a < 0 or a >= len(shape) for a in axes):
        raise ValueError(f"invalid MatrixDims {dims} for a leaf of shape {shape}")


def to_matrix(x: jax.Array, dims: MatrixDims) -> jax.Array:
    """Views ``x`` as ``(batch, out, in)``; batch axes are flattened (>= 1)."""
    _check_dims(x.shape, dims)
    red, out = tuple(dims.reduction_axes), tuple(dims.output_axes)
    batch = tuple(a for a in range(x.ndim) if a not in red + out)
    xt = jnp.transpose(x, batch + out + red)
    b = math.prod(x.shape[a] for a in batch)
    m = math.prod(x.shape[a] for a in out)
    n = math.prod(x.shape[a] for a in red)
    return xt.reshape(b, m, n)


def from_matrix(y: jax.Array, dims: MatrixDims, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `to_matrix` for a leaf of ``shape``."""
    red, out = tuple(dims.reduction_axes), tuple(dims.output_axes)
    batch = tuple(a for a in range(len(shape)) if a not in red + out)
    perm = batch + out + red
    y = y.reshape(tuple(shape[a] for a in perm))
    inv = [0] * len(perm)
    for i, a in enumerate(perm):
        inv[a] = i
    return jnp.transpose(y, inv)


def map_matrices(
    fn: Callable[[jax.Array], jax.Array],
    updates: Any,
    dims: DimsSpec = None,
    *,
    other: Callable[[jax.Array], jax.Array] | None = None,
) -> Any:
    """Applies ``fn`` to every matrix leaf in the ``(out, in)`` view.

    ``fn`` maps one ``(m, n)`` matrix (``m = out``, ``n = in``) to a matrix of
    the same shape; it is `jax.vmap`-ed over the batch axes. Leaves without a
    matrix view are passed to ``other`` (identity if None).
    """
    dims_tree = matrix_dims_tree(updates, dims)
    vfn = jax.vmap(fn)

    def leaf(d, u):
        if isinstance(u, optax.MaskedNode):
            return u
        if d is None:
            return u if other is None else other(u)
        return from_matrix(vfn(to_matrix(u, d)), d, u.shape)

    return jax.tree.map(
        leaf,
        dims_tree,
        updates,
        is_leaf=lambda x: x is None or isinstance(x, (MatrixDims, optax.MaskedNode)),
    )


def matrix_labels(
    params: Any,
    *,
    exclude: str | None = EXCLUDE_FROM_MATRIX,
    dims: DimsSpec = None,
    matrix_label: str = "matrix",
    other_label: str = "adamw",
) -> Any:
    """Labels each leaf ``matrix_label`` or ``other_label`` for `optax.partition`.

    A leaf is a matrix when it has a matrix view (see `matrix_dims_tree`), both
    its ``m`` and ``n`` exceed 1, and its path does not match ``exclude``
    (embeddings and the LM head by default; pass None to keep them).
    """
    dims_tree = matrix_dims_tree(params, dims)
    pat = re.compile(exclude) if exclude else None

    def label(path, d, x):
        if d is None or not hasattr(x, "shape"):
            return other_label
        m = math.prod(x.shape[a] for a in d.output_axes)
        n = math.prod(x.shape[a] for a in d.reduction_axes)
        if min(m, n) <= 1 or (pat is not None and pat.search(path_names(path))):
            return other_label
        return matrix_label

    return jax.tree_util.tree_map_with_path(
        label, dims_tree, params, is_leaf=lambda x: x is None or isinstance(x, MatrixDims)
    )


def partition_matrices(
    matrix_tx: optax.GradientTransformation,
    other_tx: optax.GradientTransformation,
    *,
    labels: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Routes matrix leaves to ``matrix_tx`` and the rest to ``other_tx``.

    Args:
      matrix_tx: transform for hidden matrices (labelled ``"matrix"``).
      other_tx: fallback (usually AdamW) for everything labelled ``"adamw"``.
      labels: None (use `matrix_labels` on the params), a callable
        ``params -> label tree``, or a label tree with values in
        ``{"matrix", "adamw"}``.

    Returns:
      An `optax.partition` of the two transforms.
    """
    return optax.partition(
        {"matrix": matrix_tx, "adamw": other_tx},
        matrix_labels if labels is None else labels,
    )
