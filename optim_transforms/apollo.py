"""APOLLO and APOLLO-Mini: AdamW's learning-rate scaling estimated in a random low-rank space.

For every matrix slice ``G`` (``m = out`` rows, ``n = in`` columns, the
PyTorch view of `optim_transforms.matrix`), APOLLO projects ``G`` onto a
random Gaussian rank-``r`` subspace of its smaller side, keeps Adam moments of
the projection ``R``, turns the low-rank Adam update ``R~ = M / (sqrt(V) + eps)``
into a per-channel (or per-tensor) scale ``s = ||R~|| / (||R|| + 1e-8)`` and
steps along the **raw** gradient scaled by it, ``U = G * s``, limited by
Fira's norm-growth limiter. The maths is ALGORITHMS.md §3; the reference
behaviour is ``apollo-torch==1.0.3`` (``APOLLOAdamW``).

Layouts. The projection side is chosen on the semantic ``(out, in)`` sizes of
the matrix view, never on the raw array shape: ``m >= n`` compresses ``in``
(``P`` is ``r x n``, ``R = G P^T`` is ``m x r``, one scale per output row);
``m < n`` compresses ``out`` (``P`` is ``m x r``, ``R = P^T G`` is ``r x n``,
one scale per input column). The tie ``m == n`` compresses ``in``. A Flax
``Dense`` kernel ``(in, out)`` is the transpose of the PyTorch weight, so its
moments are the transpose of apollo-torch's.

State layout. The low-rank moments are stored in the **param's own axis
order** with the compressed axes replaced: the first compressed axis (in the
order of `MatrixDims`) becomes ``r`` and any other compressed axis becomes 1.
A Flax ``(in, out)`` kernel with ``out >= in`` keeps moments of shape
``(r, out)``; an attention output kernel ``(heads, head_dim, d)`` keeps
``(r, 1, d)``; a scanned ``(L, in, out)`` kernel with ``out < in`` keeps
``(L, in, r)``. The moments therefore have the param's rank and the param's
size on every kept axis, so `optim_transforms.sharding.state_shardings` shards
them like the param on the full-size axes they keep. The limiter's previous
norm has one entry per matrix slice (the batch shape of the view). ``P`` is
**not stored**: it is regenerated on every step from the key data in the
state, a 31-bit CRC of the param's key path and ``step // update_proj_gap``
(``r * min(m, n)`` Gaussian samples per slice and step, cheap next to the
``O(mnr)`` projection), so a restart from a checkpoint reproduces it exactly.

Rank. A slice whose compressed dimension ``min(m, n)`` is smaller than
``rank`` uses ``r = min(rank, min(m, n))`` (``P ~ N(0, 1/r)`` with that ``r``),
so that one ``rank`` works for every layer of a small model. apollo-torch
would instead build an ``r x n`` projection with ``r > n`` (more state, same
information); ALGORITHMS.md §3.4 asks for ``r <= min(m, n)``, which the clamp
guarantees.

References:
  Zhu, Zhang, Cong, Liu, Park, Chandra, Long, Pan, Wang, Lee. "APOLLO:
  SGD-like Memory, AdamW-level Performance", MLSys 2025, arXiv:2412.05270.
  https://github.com/zhuhanqing/APOLLO (``apollo-torch``).
  Chen et al. "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
  Constraint?", arXiv:2410.01623 (norm-growth limiter).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_transforms import validate as V
from optim_transforms.cautious import maybe_cautious
from optim_transforms.matrix import (
    DimsSpec,
    MatrixDims,
    from_matrix,
    matrix_dims_tree,
    matrix_labels,
    partition_matrices,
    path_names,
    to_matrix,
)

__all__ = [
    "LowRankMoments",
    "RandomProjScaleState",
    "NormGrowthState",
    "random_proj_scale",
    "norm_growth_limiter",
    "apollo",
    "apollo_mini",
]

ProjFn = Callable[[str, jax.Array, tuple[int, ...]], jax.Array]

_NORM_EPS = 1e-8  # official: in the scale's denominator and in the limiter


class LowRankMoments(NamedTuple):
    """Adam moments of the projected gradient ``R`` (fp32, layout in the module doc)."""

    mu: jax.Array
    nu: jax.Array


class RandomProjScaleState(NamedTuple):
    """State of `random_proj_scale`.

    Attributes:
      count: int32 number of steps taken (``t - 1`` during step ``t``).
      key: uint32 key data of ``jax.random.key(seed)``; ``P`` derives from it.
      moments: a tree with the params' structure: `LowRankMoments` for matrix
        leaves, ``None`` for leaves without a matrix view.
      prev_norm: a tree with the params' structure: the limiter's ``nu`` (the
        norm of the last limited update) per matrix slice, shape = the batch
        shape of the matrix view (``()`` for a plain matrix); ``None`` for
        non-matrix leaves or when the limiter is off.
    """

    count: jax.Array
    key: jax.Array
    moments: Any
    prev_norm: Any


class NormGrowthState(NamedTuple):
    """State of `norm_growth_limiter`: step count and the previous norm per slice/leaf."""

    count: jax.Array
    prev_norm: Any


class _Plan(NamedTuple):
    """Static facts about one matrix leaf."""

    dims: MatrixDims
    batch_shape: tuple[int, ...]
    m: int
    n: int
    compress_in: bool


def _plan(shape: tuple[int, ...], dims: MatrixDims) -> _Plan:
    red, out = tuple(dims.reduction_axes), tuple(dims.output_axes)
    batch = tuple(a for a in range(len(shape)) if a not in red + out)
    m = math.prod(shape[a] for a in out)
    n = math.prod(shape[a] for a in red)
    return _Plan(dims, tuple(shape[a] for a in batch), m, n, m >= n)


def _moment_shape(shape: tuple[int, ...], plan: _Plan, rank: int) -> tuple[int, ...]:
    axes = plan.dims.reduction_axes if plan.compress_in else plan.dims.output_axes
    new = list(shape)
    for i, a in enumerate(axes):
        new[a] = rank if i == 0 else 1
    return tuple(new)


def _path_hash(path: str) -> int:
    """A stable (unsalted) 31-bit hash of a param's key path."""
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


# Largest projection (elements) drawn together with others of its shape; see
# `_sample_projections`.
_BATCHED_DRAW_MAX_SIZE = 1 << 16


def _sample_projections(
    key_data: jax.Array, block: jax.Array, requests: list[tuple[str, tuple[int, ...], int]]
) -> list[jax.Array]:
    """``P`` for each ``(path, shape, rank)`` request: i.i.d. ``N(0, 1/rank)`` of that shape.

    ``shape`` is ``(batch, a, b)``; slice ``i`` of a leaf draws with key
    ``fold_in(fold_in(fold_in(key(seed), crc(path)), block), i)``. The draws
    are batched: the leaf keys in one vmapped fold-in, and the small requests
    of one shape in one vmapped draw (the values are those of separate draws).
    On CPU each Threefry call is a `while` loop with a per-iteration cost, so
    four calls per leaf (~340 loops per step for llama-130m) cost about as
    much as a pass over the gradients; batched it is 2 + 2 per shape.
    Requests larger than `_BATCHED_DRAW_MAX_SIZE` are drawn one by one: there
    the draw's arithmetic dominates, and one stacked draw sliced per leaf was
    slower (APOLLO r=256 on llama-130m: 445 -> 518 ms per update).
    """
    if not requests:
        return []
    base = jax.random.wrap_key_data(key_data)
    hashes = jnp.asarray([_path_hash(path) for path, _, _ in requests], jnp.uint32)
    keys = jax.vmap(lambda h: jax.random.fold_in(jax.random.fold_in(base, h), block))(hashes)
    groups: dict[tuple[tuple[int, ...], int, int], list[int]] = {}
    for i, (_, shape, rank) in enumerate(requests):
        alone = math.prod(shape) > _BATCHED_DRAW_MAX_SIZE
        groups.setdefault((shape, rank, i if alone else -1), []).append(i)
    out: list[Any] = [None] * len(requests)
    for (shape, rank, _), idx in groups.items():

        def draw(key, shape=shape):
            slices = jax.vmap(lambda n: jax.random.fold_in(key, n))(jnp.arange(shape[0]))
            return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(slices)

        p = jax.vmap(draw)(keys[jnp.asarray(idx)]) / jnp.sqrt(jnp.float32(rank))
        for j, i in enumerate(idx):
            out[i] = p[j]
    return out


def _limit_factor(norm: jax.Array, prev: jax.Array, first: jax.Array, gamma: Any):
    """Norm-growth limiter for an update of norm ``norm``: ``(divisor, new prev norm)``."""
    lim = jnp.maximum(norm / (prev + _NORM_EPS), gamma) / gamma
    lim = jnp.where(first, jnp.ones_like(lim), lim)
    return lim, norm / lim


def _limit(u: jax.Array, prev: jax.Array, first: jax.Array, gamma: Any):
    """Norm-growth limiter on one slice: ``||u_t|| <= gamma * ||u_{t-1}||`` (Frobenius norm)."""
    lim, new_prev = _limit_factor(jnp.linalg.norm(u), prev, first, gamma)
    return u / lim, new_prev


# Below this a sum of squares may have lost squares to fp32 underflow.
_MIN_SAFE_SQ = 2.0**-60


def _scaled_norm(g32: jax.Array, coef: jax.Array, axes: tuple[int, ...], *, tensor: bool):
    """``||g32 * coef||`` over ``axes`` (keepdims), in fp32, without forming ``g32 * coef``.

    With one ``coef`` per slice (``tensor``) this is ``|coef| * ||g32||``: a
    plain sum of squares, which XLA:CPU reduces ~1.5x faster than
    ``sum((g32 * coef)**2)`` with a traced ``coef`` (measured on 24 x
    (768, 2048) leaves: 6.0 vs 9.8 ms). ``g32**2`` can overflow (|g| > 1.8e19)
    or underflow (|g| < 5e-20) where ``g32 * coef`` does not, so when the sum
    is not finite or below `_MIN_SAFE_SQ` the direct form is computed instead
    (a `lax.cond` on one predicate: one more pass over ``g32``, only then).
    Per-channel ``coef`` keeps the direct form.
    """

    def direct():
        return jnp.sqrt(jnp.sum(jnp.square(g32 * coef), axis=axes, keepdims=True))

    if not tensor:
        return direct()
    sq = jnp.sum(g32 * g32, axis=axes, keepdims=True)
    safe = jnp.all(jnp.isfinite(sq) & (sq >= _MIN_SAFE_SQ))
    return jax.lax.cond(safe, lambda: jnp.abs(coef) * jnp.sqrt(sq), direct)


def _bias_correction(b1: Any, b2: Any, t: jax.Array) -> jax.Array:
    """``sqrt(1 - b2**t) / (1 - b1**t)`` accurate in fp32.

    ``1 - b**t = -expm1(t * log1p(-(1 - b)))`` with ``1 - b`` taken in Python
    double precision when ``b`` is a Python float: the naive fp32 form is off by
    ~1e-5 relative at ``t = 1`` for ``b2 = 0.999`` (apollo-torch computes it in
    float64). Injected (array) betas get ``1 - b`` in their own dtype.
    """

    def one_minus_pow(b):
        omb = 1.0 - b if isinstance(b, (int, float)) else 1.0 - jnp.asarray(b, jnp.float32)
        return -jnp.expm1(t * jnp.log1p(-jnp.asarray(omb, jnp.float32)))

    return jnp.sqrt(one_minus_pow(b2)) / one_minus_pow(b1)


def _static_int(fn: str, arg: str, value: Any, minimum: int) -> int | None:
    """``value`` as a Python int (0-d arrays from `optax.inject_hyperparams` too).

    Returns None for a traced value (re-built inside a jitted update, where
    the integer is read from the state's shapes instead).
    """
    if hasattr(value, "dtype") and getattr(value, "shape", None) == ():
        try:
            value = value.item()
        except Exception:  # a tracer
            return None
    V.check_int(fn, arg, value, minimum=minimum)
    return value


def _is_masked(x: Any) -> bool:
    return x is None or isinstance(x, (MatrixDims, optax.MaskedNode))


def random_proj_scale(
    *,
    rank: int,
    scale_type: str = "channel",
    update_proj_gap: int = 200,
    scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    scale_front: bool = False,
    norm_growth_gamma: float | None = 1.01,
    bias_correction: bool = True,
    seed: int = 0,
    dims: DimsSpec = None,
    proj_fn: ProjFn | None = None,
) -> optax.GradientTransformation:
    """APOLLO's direction: gradient scaled by a low-rank Adam estimate, norm-limited.

    Per matrix slice ``G`` (``m x n``, ``m = out``, ``n = in``), step ``t``:

    * ``P`` (i.i.d. ``N(0, 1/r)``) is redrawn when ``(t - 1) % update_proj_gap
      == 0``; ``R = G P^T`` (``m x r``) if ``m >= n`` else ``R = P^T G`` (``r x n``);
    * ``M <- b1 M + (1 - b1) R``, ``V <- b2 V + (1 - b2) R**2`` (never reset
      when ``P`` changes, as in apollo-torch), ``R~ = M / (sqrt(V) + eps)``;
    * ``"channel"``: ``s = ||R~||_2 / (||R||_2 + 1e-8)`` with both norms over
      the rank axis, one scale per row (``m >= n``) or per column (``m < n``);
      ``"tensor"``: ``s = ||R~||_F / (||R||_F + 1e-8)``;
    * ``U = G * s``; ``U <- NL(U)`` (see `norm_growth_limiter`, one ``nu`` per
      slice); ``U <- sqrt(scale) U`` (before NL if ``scale_front``);
    * output ``b_t U`` with ``b_t = sqrt(1 - b2**t) / (1 - b1**t)``.

    The output has the gradient's sign convention (multiply by ``-lr``).
    Moments, norms and ``P`` are fp32; the output has the gradient's dtype.
    Leaves without a matrix view (see `optim_transforms.matrix.matrix_dims_tree`)
    pass through unchanged: route them to AdamW with `partition_matrices`, as
    `apollo` does. Layouts, state layout and the rank clamp
    ``r = min(rank, min(m, n))`` are described in the module docstring; ``P`` is
    regenerated from the key data in the state, not stored.

    Args:
      rank: projection rank ``r`` (clamped per slice to ``min(m, n)``).
      scale_type: ``"channel"`` (APOLLO) or ``"tensor"`` (APOLLO-Mini).
      update_proj_gap: steps between projection refreshes.
      scale: ``alpha``; the update is multiplied by ``sqrt(alpha)``.
      b1, b2, eps: Adam hyperparameters of the low-rank moments (``eps`` is
        added to ``sqrt(V)``, not bias-corrected, as in apollo-torch).
      scale_front: apply ``sqrt(scale)`` before the limiter instead of after.
      norm_growth_gamma: the limiter's growth bound ``gamma``; None disables
        it (apollo-torch's ``disable_nl``).
      bias_correction: multiply by ``b_t`` (apollo-torch's ``correct_bias``).
      seed: seed of the projections.
      dims: matrix view (see `optim_transforms.matrix.matrix_dims_tree`).
      proj_fn: test hook replacing the random projection:
        ``proj_fn(path, block, shape) -> P`` with ``path`` the leaf's key path
        as ``'a/b/kernel'``, ``block = (t - 1) // update_proj_gap`` (traced
        int32) and ``shape`` = ``(batch, r, n)`` if ``m >= n`` else
        ``(batch, m, r)``. With `optax.inject_hyperparams` pass it in
        ``static_args``.

    Returns:
      An `optax.GradientTransformation` with `RandomProjScaleState`.

    References:
      Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
      arXiv:2412.05270, Algorithm 1; apollo-torch 1.0.3 ``APOLLOAdamW``.
    """
    fn = "random_proj_scale"
    rank = _static_int(fn, "rank", rank, 1)
    _static_int(fn, "update_proj_gap", update_proj_gap, 1)
    _static_int(fn, "seed", seed, 0)
    V.check_choice(fn, "scale_type", scale_type, ("channel", "tensor"))
    V.check_positive(fn, "scale", scale)
    V.check_beta(fn, "b1", b1)
    V.check_beta(fn, "b2", b2)
    V.check_nonnegative(fn, "eps", eps)
    if norm_growth_gamma is not None:
        V.check_positive(fn, "norm_growth_gamma", norm_growth_gamma)
    channel = scale_type == "channel"

    def init_fn(params):
        if rank is None:
            raise ValueError(f"{fn}: rank must be a concrete int at init")
        dims_tree = matrix_dims_tree(params, dims)

        def moments(d, p):
            if d is None or isinstance(p, optax.MaskedNode):
                return None
            plan = _plan(p.shape, d)
            r = min(rank, plan.m, plan.n)
            z = jnp.zeros(_moment_shape(p.shape, plan, r), jnp.float32)
            return LowRankMoments(z, z)

        def prev_norm(d, p):
            if d is None or isinstance(p, optax.MaskedNode) or norm_growth_gamma is None:
                return None
            return jnp.zeros(_plan(p.shape, d).batch_shape, jnp.float32)

        return RandomProjScaleState(
            count=jnp.zeros([], jnp.int32),
            key=jax.random.key_data(jax.random.key(seed)),
            moments=jax.tree.map(moments, dims_tree, params, is_leaf=_is_masked),
            prev_norm=jax.tree.map(prev_norm, dims_tree, params, is_leaf=_is_masked),
        )

    def update_fn(updates, state, params=None):
        del params
        dims_tree = matrix_dims_tree(updates, dims)
        count = state.count
        t = (count + 1).astype(jnp.float32)
        block = count // update_proj_gap
        first = count == 0
        sqrt_scale = jnp.sqrt(jnp.asarray(scale, jnp.float32))
        bc = _bias_correction(b1, b2, t) if bias_correction else jnp.float32(1.0)

        def geometry(d, g, mom):
            plan = _plan(g.shape, d)
            red, outs = tuple(d.reduction_axes), tuple(d.output_axes)
            batch = tuple(a for a in range(g.ndim) if a not in red + outs)
            comp = red if plan.compress_in else outs  # compressed axes
            rax = comp[0]  # the rank axis of the stored moments
            r = mom.mu.shape[rax]
            b = math.prod(g.shape[a] for a in batch)
            pshape = (b, r, plan.n) if plan.compress_in else (b, plan.m, r)
            return plan, batch, comp, rax, r, pshape

        sampled: dict[Any, jax.Array] = {}
        if proj_fn is None:
            paths, requests = [], []

            def request(path, d, g, mom):
                if d is not None and not isinstance(g, optax.MaskedNode):
                    _, _, _, _, r, pshape = geometry(d, g, mom)
                    paths.append(path)
                    requests.append((path_names(path), pshape, r))

            jax.tree_util.tree_map_with_path(
                request, dims_tree, updates, state.moments, is_leaf=_is_masked
            )
            projections = _sample_projections(state.key, block, requests)
            sampled = dict(zip(paths, projections))

        def leaf(path, d, g, mom, prev):
            # Everything is computed in the param's own layout (moments in
            # their storage layout), never on the transposed matrix view: XLA
            # would materialize transposes of G and of the moments, and for
            # r = 1 run the projection as a strided loop. The projection R is
            # one einsum over the compressed axes; a per-channel scale then has
            # the moments' shape with the rank axis reduced to 1, which
            # broadcasts against G. U = G * s is never formed before the final
            # product: the limiter's norm is ||G * s|| = sqrt(sum_c s_c^2
            # ||G_c||^2) over the scale's channels c (= s ||G|| for one
            # tensor-wise s), so G is read by the projection, one sum of squares
            # and the final ``G * coef`` (fused with the caller's ops), and no
            # full-size temporary is materialized.
            if d is None or isinstance(g, optax.MaskedNode):
                return g, mom, prev
            plan, batch, comp, rax, r, pshape = geometry(d, g, mom)
            bshape = tuple(g.shape[a] for a in batch)
            if proj_fn is None:
                p = sampled[path]
            else:
                p = proj_fn(path_names(path), block, pshape)
                p = jnp.asarray(p, jnp.float32).reshape(pshape)
            # P's matrix-view axes: (batch, r, in) or (batch, out, r), the
            # flattened sides in `MatrixDims` order (as `to_matrix`).
            lab = [chr(ord("a") + a) for a in range(g.ndim)]
            bl = "".join(lab[a] for a in batch)
            cl = "".join(lab[a] for a in comp)
            cshape = tuple(g.shape[a] for a in comp)
            if plan.compress_in:
                p, pl = p.reshape(bshape + (r,) + cshape), bl + "Z" + cl
            else:
                p, pl = p.reshape(bshape + cshape + (r,)), bl + cl + "Z"
            ml = "".join("Z" if a == rax else "" if a in comp else lab[a] for a in range(g.ndim))
            g32 = g.astype(jnp.float32)
            kept_first = min((a for a in range(g.ndim) if a not in comp), default=g.ndim)
            if rax < kept_first:
                r_vec = jnp.einsum(f"{pl},{''.join(lab)}->{ml}", p, g32)
            else:
                r_vec = jnp.einsum(f"{''.join(lab)},{pl}->{ml}", g32, p)
            r_vec = r_vec.reshape(mom.mu.shape)
            mu = b1 * mom.mu + (1.0 - b1) * r_vec
            nu = b2 * mom.nu + (1.0 - b2) * r_vec * r_vec
            r_adam = mu / (jnp.sqrt(nu) + eps)
            nb = tuple(a for a in range(g.ndim) if a not in batch)  # one slice

            def norm(x, axes):
                return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))

            s_axes = (rax,) if channel else nb
            coef = norm(r_adam, s_axes) / (norm(r_vec, s_axes) + _NORM_EPS)
            if scale_front:
                coef = coef * sqrt_scale
            new_prev = None
            if norm_growth_gamma is not None:
                u_norm = _scaled_norm(g32, coef, nb, tensor=not channel)
                lim, new_prev = _limit_factor(
                    u_norm, prev.reshape(u_norm.shape), first, norm_growth_gamma
                )
                coef = coef / lim
                new_prev = new_prev.reshape(plan.batch_shape)
            if not scale_front:
                coef = coef * sqrt_scale
            coef = coef * bc
            return (g32 * coef).astype(g.dtype), LowRankMoments(mu, nu), new_prev

        out = jax.tree_util.tree_map_with_path(
            lambda path, d, g, mom, prev: leaf(path, d, g, mom, prev),
            dims_tree,
            updates,
            state.moments,
            state.prev_norm,
            is_leaf=_is_masked,
        )
        treedef = jax.tree.structure(dims_tree, is_leaf=_is_masked)
        flat = treedef.flatten_up_to(out)
        new_updates = treedef.unflatten([x[0] for x in flat])
        new_moments = treedef.unflatten([x[1] for x in flat])
        new_prev = treedef.unflatten([x[2] for x in flat])
        return new_updates, RandomProjScaleState(
            count=optax.safe_increment(count),
            key=state.key,
            moments=new_moments,
            prev_norm=new_prev,
        )

    return optax.GradientTransformation(init_fn, update_fn)


def norm_growth_limiter(
    gamma: float = 1.01, *, dims: DimsSpec = None
) -> optax.GradientTransformation:
    """Fira's norm-growth limiter: ``||u_t|| <= gamma * ||u_{t-1}||``.

    With ``nu`` the norm of the previous (limited) update: the first step
    stores ``nu = ||u||`` and passes ``u`` unchanged; later steps divide ``u``
    by ``l = max(||u|| / (nu + 1e-8), gamma) / gamma`` and store
    ``nu = ||u|| / l``. Norms are Frobenius norms in fp32, taken per matrix
    slice (over the ``(out, in)`` axes of the matrix view, one ``nu`` per batch
    index) for leaves with a matrix view and over the whole leaf otherwise.
    A zero update stores ``nu = 0``, after which the next nonzero update is
    divided by about ``||u|| / 1e-8`` (apollo-torch does the same).

    Args:
      gamma: largest allowed growth factor of the norm from one step to the next.
      dims: matrix view (see `optim_transforms.matrix.matrix_dims_tree`).

    Returns:
      An `optax.GradientTransformation` with `NormGrowthState`.

    References:
      Chen et al., "Fira", arXiv:2410.01623, §4 (norm-growth limiter);
      as used by apollo-torch 1.0.3 ``APOLLOAdamW``.
    """
    V.check_positive("norm_growth_limiter", "gamma", gamma)

    def init_fn(params):
        dims_tree = matrix_dims_tree(params, dims)

        def leaf(d, p):
            if isinstance(p, optax.MaskedNode):
                return None
            shape = () if d is None else _plan(p.shape, d).batch_shape
            return jnp.zeros(shape, jnp.float32)

        return NormGrowthState(
            jnp.zeros([], jnp.int32), jax.tree.map(leaf, dims_tree, params, is_leaf=_is_masked)
        )

    def update_fn(updates, state, params=None):
        del params
        dims_tree = matrix_dims_tree(updates, dims)
        first = state.count == 0

        def leaf(d, u, prev):
            if isinstance(u, optax.MaskedNode):
                return u, prev
            if d is None:
                new, nrm = _limit(u.astype(jnp.float32), prev, first, gamma)
                return new.astype(u.dtype), nrm
            plan = _plan(u.shape, d)
            um = to_matrix(u, d).astype(jnp.float32)
            new, nrm = jax.vmap(lambda x, p: _limit(x, p, first, gamma))(
                um, prev.reshape(um.shape[0])
            )
            return from_matrix(new, d, u.shape).astype(u.dtype), nrm.reshape(plan.batch_shape)

        out = jax.tree.map(leaf, dims_tree, updates, state.prev_norm, is_leaf=_is_masked)
        treedef = jax.tree.structure(dims_tree, is_leaf=_is_masked)
        flat = treedef.flatten_up_to(out)
        return treedef.unflatten([x[0] for x in flat]), NormGrowthState(
            optax.safe_increment(state.count), treedef.unflatten([x[1] for x in flat])
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _scale_by_adam_official(b1: Any, b2: Any, eps: Any) -> optax.GradientTransformation:
    """apollo-torch's Adam for the non-matrix params.

    ``m / (sqrt(v) + eps) * sqrt(1 - b2**t) / (1 - b1**t)``: the bias
    correction is folded into the step size (HF ``AdamW``), so ``eps`` is not
    bias-corrected as in `optax.scale_by_adam`. Moments are fp32.
    """

    def init_fn(params):
        z = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), z, z)

    def update_fn(updates, state, params=None):
        del params
        bc = _bias_correction(b1, b2, (state.count + 1).astype(jnp.float32))
        mu = jax.tree.map(
            lambda m, g: b1 * m + (1.0 - b1) * g.astype(jnp.float32), state.mu, updates
        )
        nu = jax.tree.map(
            lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates
        )
        new = jax.tree.map(
            lambda m, v, g: (bc * m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu, nu, updates
        )
        return new, optax.ScaleByAdamState(optax.safe_increment(state.count), mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _decay_after_step(learning_rate: optax.ScalarOrSchedule, weight_decay: Any):
    """Decoupled weight decay applied to the already-stepped params (apollo-torch).

    Takes ``u = -lr * d`` and returns ``u - lr * weight_decay * (params + u)``,
    i.e. ``theta <- theta + u`` then ``theta <- theta - lr * wd * theta``.
    """
    static_zero = isinstance(weight_decay, (int, float)) and weight_decay == 0

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        new_state = optax.ScaleByScheduleState(optax.safe_increment(state.count))
        if static_zero:
            return updates, new_state
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        c = jnp.asarray(lr, jnp.float32) * jnp.asarray(weight_decay, jnp.float32)
        new = jax.tree.map(
            lambda u, p: (
                u.astype(jnp.float32) - c * (p.astype(jnp.float32) + u.astype(jnp.float32))
            ).astype(u.dtype),
            updates,
            params,
        )
        return new, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _apollo(
    fn: str,
    learning_rate,
    *,
    rank,
    scale_type,
    update_proj_gap,
    scale,
    b1,
    b2,
    eps,
    weight_decay,
    scale_front,
    norm_growth_gamma,
    seed,
    labels,
    dims,
    proj_fn,
    cautious,
    skip_nonfinite,
):
    V.check_learning_rate(fn, learning_rate)
    _static_int(fn, "rank", rank, 1)
    _static_int(fn, "update_proj_gap", update_proj_gap, 1)
    _static_int(fn, "seed", seed, 0)
    V.check_choice(fn, "scale_type", scale_type, ("channel", "tensor"))
    V.check_positive(fn, "scale", scale)
    V.check_nonnegative(fn, "weight_decay", weight_decay)
    V.check_beta(fn, "b1", b1)
    V.check_beta(fn, "b2", b2)
    V.check_nonnegative(fn, "eps", eps)
    matrix_tx = random_proj_scale(
        rank=rank,
        scale_type=scale_type,
        update_proj_gap=update_proj_gap,
        scale=scale,
        b1=b1,
        b2=b2,
        eps=eps,
        scale_front=scale_front,
        norm_growth_gamma=norm_growth_gamma,
        seed=seed,
        dims=dims,
        proj_fn=proj_fn,
    )
    if labels is None and dims is not None:
        labels = lambda params: matrix_labels(params, dims=dims)
    direction = partition_matrices(matrix_tx, _scale_by_adam_official(b1, b2, eps), labels=labels)
    tx = optax.chain(
        maybe_cautious(direction, cautious),
        optax.scale_by_learning_rate(learning_rate),
        _decay_after_step(learning_rate, weight_decay),
    )
    return V.finalize(tx, skip_nonfinite=skip_nonfinite)


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 256,
    scale_type: str = "channel",
    update_proj_gap: int = 200,
    scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    scale_front: bool = False,
    norm_growth_gamma: float | None = 1.01,
    seed: int = 0,
    labels: Any = None,
    dims: DimsSpec = None,
    proj_fn: ProjFn | None = None,
    cautious: bool = False,
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """APOLLO: `random_proj_scale` on hidden matrices, AdamW on the rest, one learning rate.

    ``chain(maybe_cautious(partition(matrix: random_proj_scale, adamw: Adam)),
    scale_by_learning_rate(lr), decay)``. The hidden attention/MLP matrices
    (default labels: `optim_transforms.matrix.matrix_labels`, i.e. not
    embeddings, LM head, 1-D params or matrices with a side of 1) step along
    ``-lr * b_t * sqrt(scale) * NL(G * s)``; the rest use apollo-torch's AdamW
    (``eps`` added to ``sqrt(v)`` before the bias correction, as HF ``AdamW``).
    Decoupled weight decay is applied as apollo-torch does, to every param,
    after the step and with the plain learning rate:
    ``theta <- theta - lr * weight_decay * theta``. ``cautious=True`` masks the
    direction before the learning rate and decay; on APOLLO matrices the
    direction is ``G * s`` with ``s >= 0``, so the mask only removes (and
    rescales around) coordinates where ``G`` or ``s`` is zero.

    Args:
      learning_rate: float or optax schedule (0.01 in the APOLLO C4 runs).
      rank: projection rank (256 for 1B/7B; about hidden/4 for small models).
      scale_type: ``"channel"`` or ``"tensor"``.
      update_proj_gap: steps between projection refreshes.
      scale: ``alpha`` (applied as ``sqrt(alpha)``).
      b1, b2, eps: Adam hyperparameters (both param groups).
      weight_decay: decoupled weight decay, applied after the step.
      scale_front: ``sqrt(scale)`` before the norm-growth limiter.
      norm_growth_gamma: limiter bound (None disables the limiter).
      seed: seed of the random projections.
      labels: None (`matrix_labels`), a callable ``params -> labels`` or a
        label tree with values ``"matrix"``/``"adamw"``.
      dims: matrix view for `random_proj_scale` (and the default labels).
      proj_fn: test hook, see `random_proj_scale`.
      cautious: wrap the direction in `optim_transforms.cautious_mask`.
      skip_nonfinite: skip steps whose gradient has a NaN/Inf (see
        `optim_transforms.validate.finalize`).

    Returns:
      A `optax.GradientTransformationExtraArgs`.

    References:
      Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
      arXiv:2412.05270; apollo-torch 1.0.3 ``APOLLOAdamW``.
    """
    return _apollo(
        "apollo",
        learning_rate,
        rank=rank,
        scale_type=scale_type,
        update_proj_gap=update_proj_gap,
        scale=scale,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        scale_front=scale_front,
        norm_growth_gamma=norm_growth_gamma,
        seed=seed,
        labels=labels,
        dims=dims,
        proj_fn=proj_fn,
        cautious=cautious,
        skip_nonfinite=skip_nonfinite,
    )


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    *,
    update_proj_gap: int = 200,
    scale: float = 128.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    scale_front: bool = False,
    norm_growth_gamma: float | None = 1.01,
    seed: int = 0,
    labels: Any = None,
    dims: DimsSpec = None,
    proj_fn: ProjFn | None = None,
    cautious: bool = False,
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """APOLLO-Mini: `apollo` with rank 1 and one tensor-wise scale per matrix.

    State per ``m x n`` matrix: ``2 * max(m, n) + 1`` floats (``P`` is
    regenerated, not stored). ``scale = 128`` enters as ``sqrt(128)``; the
    official 60M/130M scripts also set ``scale_front=True``.

    Args:
      learning_rate: float or optax schedule.
      update_proj_gap, scale, b1, b2, eps, weight_decay, scale_front,
        norm_growth_gamma, seed, labels, dims, proj_fn, cautious,
        skip_nonfinite: as in `apollo`.

    Returns:
      A `optax.GradientTransformationExtraArgs`.

    References:
      Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
      arXiv:2412.05270 (APOLLO-Mini).
    """
    return _apollo(
        "apollo_mini",
        learning_rate,
        rank=1,
        scale_type="tensor",
        update_proj_gap=update_proj_gap,
        scale=scale,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        scale_front=scale_front,
        norm_growth_gamma=norm_growth_gamma,
        seed=seed,
        labels=labels,
        dims=dims,
        proj_fn=proj_fn,
        cautious=cautious,
        skip_nonfinite=skip_nonfinite,
    )
