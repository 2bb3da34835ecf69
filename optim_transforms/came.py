"""CAME: confidence-guided adaptive memory-efficient optimization.

Adafactor's factored second moment plus a factored "confidence" statistic:
an EMA of the instability ``(u - m)**2`` rescales the momentum, giving
Adam-like steps with ``mn + 2(m + n)`` state floats per ``m x n`` matrix
(Adam keeps ``2mn``). The maths is ALGORITHMS.md §5; the reference behaviour
is ``came-pytorch==0.1.3``.

Layouts. By default (``dims=None``) a leaf of rank >= 2 is factored over its
**last two axes**, leading axes being batch, exactly as the reference does
with a PyTorch tensor of that shape. CAME is transpose-equivariant
(``CAME(G.T) == CAME(G).T``), so for a Flax ``(in, out)`` kernel this equals
the reference on the PyTorch ``(out, in)`` weight, and for scanned layers
``(L, in, out)`` it is the per-layer matrix. Two consequences of following
the reference on the array: attention kernels ``(d, heads, head_dim)`` are
``d`` slices of ``heads x head_dim`` (``2 d (heads + head_dim)`` statistic
floats instead of ``2 (d + heads * head_dim)``), and a scanned 1-D param
``(L, d)`` is factored as an ``L x d`` matrix, whereas an unscanned model's
``(d,)`` params take the unfactored path. Pass ``dims`` (e.g.
`optim_transforms.default_matrix_dims`) to factor each leaf over its matrix
view ``(out, in)`` instead (``(heads * head_dim) x d`` for that kernel); with
``dims``, leaves without a matrix view (such as ``(L, d)`` norm scales) take
the unfactored path.

State layout (fp32, per leaf, under the leaf's key path in each field): for a
factored leaf with reduction (fan-in) axes ``R`` and output axes ``O`` the
row statistics average over ``R`` and the column statistics over ``O``. In the
default layout these axes are dropped: rows ``shape[:-1]``, columns
``shape[:-2] + shape[-1:]``, the reference's buffers, which
`optim_transforms.sharding.state_shardings` shards like the param with the
reduced axis dropped. With ``dims`` they are kept with size 1 (same rank as
the param), so that the sharding rule is unambiguous when several axes are
reduced. Slots a leaf does not use hold ``None`` (no storage).

References:
  Luo, Ren, Zheng, Jiang, Jiang, You. "CAME: Confidence-guided Adaptive
  Memory Efficient Optimization", ACL 2023, arXiv:2307.02047.
  https://github.com/yangluo7/CAME (``came-pytorch``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_transforms import validate as V
from optim_transforms.cautious import maybe_cautious
from optim_transforms.matrix import DimsSpec, MatrixDims, matrix_dims_tree

__all__ = ["ScaleByCameState", "scale_by_came", "came"]

_SQUARE_CAP = 1e30  # see factored_leaf


class ScaleByCameState(NamedTuple):
    """State of `scale_by_came`; every field is a tree with the params' structure.

    Attributes:
      mu: momentum ``m`` of the (clipped) update, full size, every leaf.
      nu_row: factored second moment, row statistic (mean over the fan-in
        axes); ``None`` for unfactored leaves.
      nu_col: factored second moment, column statistic (mean over the fan-out
        axes); ``None`` for unfactored leaves.
      nu: full second moment of unfactored (0-D, 1-D) leaves; ``None`` for
        factored leaves.
      res_row: factored instability (confidence) statistic, rows; ``None`` for
        unfactored leaves or ``confidence=False``.
      res_col: factored instability statistic, columns; as ``res_row``.
    """

    mu: Any
    nu_row: Any
    nu_col: Any
    nu: Any
    res_row: Any
    res_col: Any


class _Plan(NamedTuple):
    """How one leaf is factored.

    ``red``: axes the row statistic averages over (fan-in); ``out``: axes the
    column statistic averages over (fan-out); ``keepdims``: statistics keep the
    reduced axes with size 1 (matrix-view layout) instead of dropping them
    (reference layout).
    """

    red: tuple[int, ...]
    out: tuple[int, ...]
    keepdims: bool


def _plan(x: Any, d: MatrixDims | None, use_dims: bool) -> _Plan | None:
    """The factoring of leaf ``x``, or None when it takes the unfactored path."""
    shape = jnp.shape(x)
    ndim = len(shape)
    if ndim < 2 or (use_dims and d is None):
        return None
    if not use_dims:
        return _Plan((ndim - 1,), (ndim - 2,), False)
    red, out = tuple(sorted(d.reduction_axes)), tuple(sorted(d.output_axes))
    axes = red + out
    if not red or not out or len(set(axes)) != len(axes) or any(a < 0 or a >= ndim for a in axes):
        raise ValueError(f"scale_by_came: invalid MatrixDims {d} for a leaf of shape {shape}")
    return _Plan(red, out, True)


def _plans(tree: Any, treedef: Any, dims: DimsSpec) -> list[_Plan | None]:
    leaves = treedef.flatten_up_to(tree)
    if dims is None:
        return [_plan(x, None, False) for x in leaves]
    dims_leaves = treedef.flatten_up_to(matrix_dims_tree(tree, dims))
    return [_plan(x, d, True) for x, d in zip(leaves, dims_leaves, strict=True)]


def _stat_shape(shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool) -> tuple[int, ...]:
    """Shape of a statistic averaged over ``axes`` (dropped, or kept with size 1)."""
    if keepdims:
        return tuple(1 if i in axes else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in axes)


# XLA:CPU (jax 0.10) and the factored means. Its fused ("ynn") reductions compute a
# cheap elementwise expression of the leaf while reading it once, but only while that
# expression has no other user: two sibling means of ``G**2``, or the RMS of ``u``
# that the momentum update also reads, make XLA write the expression to a fresh
# full-size temporary every step, and on CPU the page faults on that memory cost more
# than the arithmetic (the whole CAME step on a LLaMA-130M tree had 512 MiB of such
# temporaries). So on CPU every full-size reduction gets private inputs (`_Private`)
# and recomputes its cheap expression from the leaf and small vectors (measured on
# that tree: 3.58x -> 2.24x the time of optax.adamw, temporaries 512 -> 6.6 MiB);
# elsewhere (GPU/TPU fuse sibling reductions) nothing changes. Tests set True / False
# to cover both paths.
_PRIVATE_INPUTS: bool | None = None

# XLA:CPU reduces over the second-to-last axis slowly once the kept last axis is wider
# than this (measured on a 768 x 32000 LM head: ~100 ms instead of ~5 ms for the same
# reads); such column means are taken over column blocks of `_COL_CHUNK` in a loop.
_COL_CHUNK_LIMIT = 16384
_COL_CHUNK = 1024


class _Private:
    """Hands out private copies of a leaf's inputs, one set per reduction.

    Each call routes ``g`` and the given small arrays through an
    ``optimization_barrier`` chained on the previous one, so CSE cannot merge
    the expressions built from them and each reduction fuses its own producer.
    The barriers are identities: values, and so results, do not change.
    """

    def __init__(self, g: jax.Array, enabled: bool):
        self._g, self.enabled = g, enabled

    def __call__(self, *xs: Any) -> tuple[jax.Array, ...]:
        if not self.enabled:
            return (self._g, *xs)
        self._g, *xs = jax.lax.optimization_barrier((self._g, *xs))
        return (self._g, *xs)


def _chunked_col_sum(fn: Any, args: tuple[Any, ...], shape: tuple[int, ...]) -> jax.Array:
    """``sum(fn(*args), axis=-2)`` over column blocks of width `_COL_CHUNK` in a loop.

    ``args`` broadcast to ``shape``; those whose last axis has the leaf's width
    are sliced per block, the others (scalars, column-constant vectors) are used
    whole.
    """
    n = shape[-1]
    count, tail = divmod(n, _COL_CHUNK)

    def block(start, size):
        sliced = [
            jax.lax.dynamic_slice_in_dim(a, start, size, axis=-1)
            if jnp.ndim(a) == len(shape) and jnp.shape(a)[-1] == n
            else a
            for a in args
        ]
        return jnp.sum(fn(*sliced), axis=-2)

    def body(i, acc):
        start = i * _COL_CHUNK
        return jax.lax.dynamic_update_slice_in_dim(acc, block(start, _COL_CHUNK), start, axis=-1)

    acc = jax.lax.fori_loop(0, count, body, jnp.zeros(shape[:-2] + (n,), jnp.float32))
    if tail:
        acc = jax.lax.dynamic_update_slice_in_dim(
            acc, block(count * _COL_CHUNK, tail), count * _COL_CHUNK, axis=-1
        )
    return acc


def _factored_mean(
    fn: Any, axes: tuple[int, ...], plan: _Plan, private: _Private, *xs: Any
) -> jax.Array:
    """Mean of ``fn(g, *xs)`` over ``axes`` (dropped, or kept with size 1 per ``plan``)."""
    g, *xs = private(*xs)
    shape = g.shape
    count = math.prod(shape[a] for a in axes)
    if (
        private.enabled
        and not plan.keepdims
        and axes == (len(shape) - 2,)
        and shape[-1] > _COL_CHUNK_LIMIT
    ):
        return _chunked_col_sum(fn, (g, *xs), shape) / count
    return jnp.sum(fn(g, *xs), axis=axes, keepdims=plan.keepdims) / count


def _inv_sqrt_factors(row: jax.Array, col: jax.Array, plan: _Plan) -> tuple[jax.Array, jax.Array]:
    """The two factors of ``1 / sqrt(row colᵀ / mean(row))``, broadcastable to the leaf.

    ``mean(row)`` averages the row statistic over the output axes (one value
    per batch slice). Returns ``rsqrt(row / mean(row))`` expanded over ``red``
    and ``rsqrt(col)`` expanded over ``out``; their product is the rank-1
    matrix, and ``V̂`` itself is never formed.
    """
    row_k = row if plan.keepdims else jnp.expand_dims(row, plan.red)
    col_k = col if plan.keepdims else jnp.expand_dims(col, plan.out)
    ratio = row_k / jnp.mean(row_k, axis=plan.out, keepdims=True)
    # A row ~60 orders of magnitude below the mean underflows the ratio to 0 and
    # rsqrt gives inf (then NaN); clamp at the smallest normal float32, which
    # changes nothing whenever the ratio is representable.
    r_factor = jax.lax.rsqrt(jnp.maximum(ratio, jnp.finfo(jnp.float32).tiny))
    return r_factor, jax.lax.rsqrt(col_k)


def _rms(x: jax.Array) -> jax.Array:
    """Root mean square over the whole leaf (all axes, batch axes included)."""
    return jnp.sqrt(jnp.sum(x * x)) / math.sqrt(max(x.size, 1))


def scale_by_came(
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    confidence: bool = True,
    dims: DimsSpec = None,
) -> optax.GradientTransformation:
    """CAME's direction: factored second moment, RMS clip, momentum, confidence.

    Per factored leaf ``G`` (fp32; "row" reduces the fan-in axes ``R``, "col"
    the fan-out axes ``O``, every other axis is batch)::

      Q = G**2 + eps[0]
      r = b2 r + (1 - b2) mean_R(Q);   c = b2 c + (1 - b2) mean_O(Q)
      u = G * rsqrt(r / mean_O(r)) * rsqrt(c)          # G / sqrt(r cᵀ / mean(r))
      u = u / max(1, RMS(u) / clip_threshold)          # RMS over the whole leaf
      m = b1 m + (1 - b1) u
      U = (u - m)**2 + eps[1]                           # with the updated m
      R = b3 R + (1 - b3) mean_R(U);   C = b3 C + (1 - b3) mean_O(U)
      step = m * rsqrt(R / mean_O(R)) * rsqrt(C)

    0-D and 1-D leaves keep a full ``v = b2 v + (1 - b2) Q``, use
    ``u = G / sqrt(v)``, clip, update ``m`` and return ``m`` (the reference
    applies no confidence term to them). There is no bias correction. With
    ``confidence=False`` the factored step is ``m``: factored Adafactor with
    momentum and update clipping (fixed ``b2``, no relative step).

    Args:
      b1: momentum rate of the clipped update.
      b2: EMA rate of the squared gradient.
      b3: EMA rate of the instability ``(u - m)**2``.
      eps: ``(eps1, eps2)`` added to the squared gradient and to the
        instability; both > 0 (they keep the statistics positive, so zero
        gradients give zero, finite steps).
      clip_threshold: ``d`` in the RMS clip ``u / max(1, RMS(u) / d)``.
      confidence: apply the confidence correction (False: Adafactor with
        momentum).
      dims: None (default, the reference): every leaf of rank >= 2 is factored
        over its last two axes, the last one being reduced by the row
        statistic. Otherwise a `MatrixDims` spec as accepted by
        `optim_transforms.matrix.matrix_dims_tree` (a `MatrixDims`, a callable
        ``(path, shape) -> MatrixDims | None`` such as
        `optim_transforms.default_matrix_dims`, or a tree): leaves are factored
        over their ``(out, in)`` matrix view (row statistic over the reduction
        axes, column statistic over the output axes, one factorization per
        batch slice, statistics keep the reduced axes with size 1); leaves
        without a view take the unfactored path.

    Returns:
      An `optax.GradientTransformation` whose state is a `ScaleByCameState`
      (fp32) and whose updates have the dtype of the incoming updates.

    References:
      Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient
      Optimization", ACL 2023, Algorithm 1; ``came-pytorch==0.1.3``.
    """
    fn = "scale_by_came"
    V.check_beta(fn, "b1", b1)
    V.check_beta(fn, "b2", b2)
    V.check_beta(fn, "b3", b3)
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"{fn}: eps={eps!r} must be a pair (eps1, eps2)")
    V.check_positive(fn, "eps[0]", eps[0])
    V.check_positive(fn, "eps[1]", eps[1])
    V.check_positive(fn, "clip_threshold", clip_threshold)
    if not isinstance(confidence, bool):
        raise ValueError(f"{fn}: confidence={confidence!r} must be a bool")
    eps1, eps2 = eps

    def init_leaf(x, plan):
        f32 = jnp.float32
        mu = jnp.zeros(jnp.shape(x), f32)
        if plan is None:
            return mu, None, None, jnp.zeros(jnp.shape(x), f32), None, None
        row = jnp.zeros(_stat_shape(jnp.shape(x), plan.red, plan.keepdims), f32)
        col = jnp.zeros(_stat_shape(jnp.shape(x), plan.out, plan.keepdims), f32)
        if not confidence:
            return mu, row, col, None, None, None
        return mu, row, col, None, jnp.zeros_like(row), jnp.zeros_like(col)

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        per_leaf = [init_leaf(x, p) for x, p in zip(leaves, _plans(params, treedef, dims))]
        fields = zip(*per_leaf) if per_leaf else [()] * len(ScaleByCameState._fields)
        return ScaleByCameState(*(treedef.unflatten(list(f)) for f in fields))

    def dense_leaf(g_in, g, mu, nu):
        # g*g overflows float32 for |g| > 1.8e19; capping the square at 1e30 (see
        # factored_leaf) changes nothing for |g| <= 1e15 and keeps the update finite.
        nu = b2 * nu + (1.0 - b2) * (jnp.minimum(g * g, _SQUARE_CAP) + eps1)
        u = jax.lax.rsqrt(nu) * g
        u = u / jnp.maximum(_rms(u) / clip_threshold, 1.0)
        mu = b1 * mu + (1.0 - b1) * u
        return mu.astype(g_in.dtype), mu, None, None, nu, None, None

    def factored_leaf(g_in, g, plan, mu, nu_row, nu_col, res_row, res_col):
        # Every full-size expression is recomputed by each consumer from g, mu and
        # small vectors (see _PRIVATE_INPUTS); only mu and the step are written.
        # Constants are applied to the means, not to every element (fewer operations
        # inside the fused reductions): mean(min(G², cap) + eps1) becomes
        # min(mean(G²), cap) + eps1, equal unless some |g| > 1e15, where the cap only
        # keeps the statistics finite (g*g overflows float32 for |g| > 1.8e19 and
        # r cᵀ / mean(r) would give inf/inf = NaN).
        enabled = _PRIVATE_INPUTS if _PRIVATE_INPUTS is not None else jax.default_backend() == "cpu"
        private = _Private(g, enabled)

        def square(g):
            return g * g

        def q_mean(axes):
            return jnp.minimum(_factored_mean(square, axes, plan, private), _SQUARE_CAP) + eps1

        nu_row = b2 * nu_row + (1.0 - b2) * q_mean(plan.red)
        nu_col = b2 * nu_col + (1.0 - b2) * q_mean(plan.out)
        r_f, c_f = _inv_sqrt_factors(nu_row, nu_col, plan)

        def scaled(g, r, c):  # u = G * r cᵀ (r, c broadcast over the leaf)
            return g * r * c

        g_p, r_p, c_p = private(r_f, c_f)
        rms = _rms(scaled(g_p, r_p, c_p))
        r_u = r_f / jnp.maximum(rms / clip_threshold, 1.0)  # the clip, folded into r
        mu = b1 * mu + (1.0 - b1) * scaled(g, r_u, c_f)
        if not confidence:
            return mu.astype(g_in.dtype), mu, nu_row, nu_col, None, res_row, res_col

        def instability(g, m, r, c):  # (u - m)**2 with the updated m
            return jnp.square(scaled(g, r, c) - m)

        def res_mean(axes):
            return _factored_mean(instability, axes, plan, private, mu, r_u, c_f) + eps2

        res_row = b3 * res_row + (1.0 - b3) * res_mean(plan.red)
        res_col = b3 * res_col + (1.0 - b3) * res_mean(plan.out)
        r_s, c_s = _inv_sqrt_factors(res_row, res_col, plan)
        step = mu * r_s * c_s
        return step.astype(g_in.dtype), mu, nu_row, nu_col, None, res_row, res_col

    def update_leaf(g_in, plan, mu, nu_row, nu_col, nu, res_row, res_col):
        g_in = jnp.asarray(g_in)
        g = g_in.astype(jnp.float32)
        if plan is None:
            return dense_leaf(g_in, g, mu, nu)
        return factored_leaf(g_in, g, plan, mu, nu_row, nu_col, res_row, res_col)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        plans = _plans(updates, treedef, dims)
        fields = [treedef.flatten_up_to(f) for f in state]
        out = [update_leaf(g, p, *s) for g, p, *s in zip(leaves, plans, *fields, strict=True)]
        if not out:
            return updates, state
        cols = [treedef.unflatten(list(c)) for c in zip(*out)]
        return cols[0], ScaleByCameState(*cols[1:])

    return optax.GradientTransformation(init_fn, update_fn)


def came(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
    mask: Any = None,
    confidence: bool = True,
    dims: DimsSpec = None,
    cautious: bool = False,
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The CAME optimizer: `scale_by_came`, decoupled weight decay, learning rate.

    ``chain(scale_by_came(...), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``, i.e.
    ``θ ← θ - lr·wd·θ - lr·step``, which is what ``came-pytorch`` does
    (``p *= 1 - lr·wd`` with the same ``lr``, then ``p -= lr·step``; the step
    does not depend on ``θ``, so the order does not matter). All params are
    handled (1-D ones on the unfactored path), as in the reference.

    Args:
      learning_rate: float or optax schedule (no default in the reference;
        Adam-range values, e.g. 1e-4 to 2e-4, with warmup).
      b1, b2, b3: rates of the momentum, the squared-gradient EMA and the
        instability EMA (the reference's ``betas``).
      eps: ``(eps1, eps2)`` for the squared gradient and the instability.
      clip_threshold: RMS threshold ``d`` of the update clip.
      weight_decay: decoupled weight decay, multiplied by the learning rate.
      mask: weight-decay mask, as in `optax.adamw`.
      confidence: False gives factored Adafactor with momentum.
      dims: None (reference: last two axes) or a matrix-view spec such as
        `optim_transforms.default_matrix_dims`; see `scale_by_came`. Under
        `optax.inject_hyperparams` a callable ``dims`` needs
        ``static_args=("dims",)`` (optax takes callables for schedules).
      cautious: wrap `scale_by_came` in `optim_transforms.cautious_mask`
        (weight decay is never masked).
      skip_nonfinite: skip steps whose gradient has a NaN/Inf (see
        `optim_transforms.validate.finalize`).

    Returns:
      A `optax.GradientTransformationExtraArgs`.

    References:
      Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient
      Optimization", ACL 2023, arXiv:2307.02047.
    """
    fn = "came"
    V.check_learning_rate(fn, learning_rate)
    V.check_nonnegative(fn, "weight_decay", weight_decay)
    tx = optax.chain(
        maybe_cautious(
            scale_by_came(
                b1=b1,
                b2=b2,
                b3=b3,
                eps=eps,
                clip_threshold=clip_threshold,
                confidence=confidence,
                dims=dims,
            ),
            cautious,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return V.finalize(tx, skip_nonfinite=skip_nonfinite)
