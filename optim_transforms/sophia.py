"""Sophia: momentum divided by a clipped diagonal-Hessian estimate (Sophia-H, Sophia-G).

The optimizer is the chain (ALGORITHMS.md §2.2)::

    momentum(b1) -> hutchinson_precond(b2, rho, eps) -> clip_by_ratio(1)
                 -> add_decayed_weights(wd, mask) -> scale_by_learning_rate(lr)

i.e. per coordinate ``u = clip(m / max(rho * h, eps), -1, 1)`` and
``theta <- theta - lr * wd * theta - lr * u``, where ``h`` is an EMA of a
diagonal Hessian estimate refreshed every ``update_every`` steps.

Hessian information enters ``update`` as the keyword ``hessian_diag=`` (a tree
like the params), computed by the training step on refresh steps with
`hutchinson_diag` (Sophia-H) or `gnb_diag` (Sophia-G). Passing ``None`` or a
tree changes the jit signature, so a training loop compiles two step
functions, a plain one and a refresh one (`sophia_step_fns`, `is_refresh_step`).
As a drop-in for `optax.contrib.sophia` users, `hutchinson_precond` also
accepts ``obj_fn=`` (``params -> scalar loss``) and then computes the
Hutchinson estimate itself on refresh steps, under `jax.lax.cond`.

Everything is element-wise: the layout of a parameter (Flax ``(in, out)`` or
PyTorch ``(out, in)``) does not matter, and 0-D/1-D params need no special case.

References:
  Liu, Li, Hall, Liang, Ma. "Sophia: A Scalable Stochastic Second-order
  Optimizer for Language Model Pre-training", arXiv:2305.14342.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim_transforms import validate as V
from optim_transforms.cautious import maybe_cautious

__all__ = [
    "hutchinson_diag",
    "gnb_diag",
    "hutchinson_precond",
    "clip_by_ratio",
    "sophia_h",
    "sophia_g",
    "is_refresh_step",
    "resolve_refresh_phase",
    "sophia_step_fns",
    "SophiaStepFns",
    "HutchinsonPrecondState",
    "ClipByRatioState",
    "SophiaMomentumState",
]

HESSIAN_UPDATE_ORDERS = ("before", "after")
DISTRIBUTIONS = ("rademacher", "gaussian")
# eps of the canonical max form ``max(gamma * h, eps)`` and of the official
# SophiaG code's additive form ``rho * bs * h + 1e-15``.
_CANONICAL_EPS = 1e-12
_OFFICIAL_EPS = 1e-15

_f32 = jnp.float32


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


# ---------------------------------------------------------------------------
# Hessian-diagonal estimators
# ---------------------------------------------------------------------------


def _probe(key: jax.Array, params: Any, distribution: str) -> Any:
    """Random probe ``v`` like ``params`` (in each leaf's dtype).

    Drawn exactly as `optax.contrib.hutchinson_estimator_diag_hessian` draws
    it (`optax.tree.random_like` with one sub-key per leaf), so that the
    internal estimator reproduces optax's for the same key.
    """
    sampler = jax.random.rademacher if distribution == "rademacher" else jax.random.normal
    v = optax.tree.random_like(key, params, sampler, dtype=_f32)
    return jax.tree.map(lambda r, p: r.astype(jnp.asarray(p).dtype), v, params)


def _hutchinson(obj_fn: Callable[[Any], jax.Array], params: Any, key, distribution: str) -> Any:
    v = _probe(key, params, distribution)
    hvp = jax.jvp(jax.grad(obj_fn), (params,), (v,))[1]
    return jax.tree.map(lambda r, hv: r.astype(_f32) * hv.astype(_f32), v, hvp)


def hutchinson_diag(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    key: jax.Array,
    *,
    distribution: str = "rademacher",
) -> Any:
    """Hutchinson estimate of the Hessian diagonal: ``v * (H v)``, per element.

    ``v`` is a random probe like ``params`` (Rademacher by default, the paper's
    standard normal with ``distribution="gaussian"``) and ``H v`` is a
    Hessian-vector product computed forward-over-reverse,
    ``jax.jvp(jax.grad(loss), (params,), (v,))``; the Hessian is never formed.
    ``E[v * Hv] = diag(H)``; for a separable loss a single Rademacher probe is
    exact. The estimate can be negative. Cost: about 2-3 gradients.

    Args:
      loss_fn: ``(params, batch) -> scalar`` loss.
      params: the point at which the Hessian is taken (any pytree of arrays).
      batch: passed to ``loss_fn`` unchanged.
      key: a PRNG key.
      distribution: ``"rademacher"`` or ``"gaussian"``.

    Returns:
      A float32 tree like ``params``.

    References:
      Liu et al., arXiv:2305.14342, Algorithm 1 (Hutchinson); Hutchinson (1989).
    """
    V.check_choice("hutchinson_diag", "distribution", distribution, DISTRIBUTIONS)
    return _hutchinson(lambda p: loss_fn(p, batch), params, key, distribution)


def gnb_diag(
    logits_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    key: jax.Array,
    *,
    mask: jax.Array | None = None,
    max_norm: float | None = None,
) -> Any:
    """Gauss-Newton-Bartlett estimate of the Hessian diagonal: ``B * g_hat**2``.

    Labels ``y_hat ~ softmax(logits)`` are sampled from the model's own
    distribution (independently per position, treated as constants),
    ``g_hat = grad (1/B) sum_b CE(logits_b, y_hat_b)`` is the gradient of the
    mean cross-entropy on those labels, and the estimate is ``B * g_hat * g_hat``
    element-wise, with ``B`` the number of (unmasked) token positions. It is
    >= 0 and its expectation is the diagonal of the Gauss-Newton matrix of the
    mean cross-entropy. One forward and one backward pass (`jax.vjp`).

    The softmax and the sampling act on the last axis of the logits; every
    leading axis is a token position. Under data parallelism (a sharded batch
    under `jax.jit`) ``g_hat`` is reduced over the whole batch before it is
    squared and ``B`` is the global count, as the paper prescribes.

    Args:
      logits_fn: ``(params, batch) -> logits [..., V]``.
      params: the point at which the estimate is taken.
      batch: passed to ``logits_fn`` unchanged.
      key: a PRNG key for the label sampling.
      mask: optional weights of shape ``logits.shape[:-1]`` (1 for real tokens,
        0 for padding); ``B = sum(mask)``.
      max_norm: if set, ``g_hat`` is clipped to this global norm before it is
        squared (the official SophiaG loop clips it to 1.0).

    Returns:
      A float32 tree like ``params``.

    References:
      Liu et al., arXiv:2305.14342, Algorithm 2 (GNB).
    """
    if max_norm is not None:
        V.check_positive("gnb_diag", "max_norm", max_norm)
    logits, vjp_fn = jax.vjp(lambda p: logits_fn(p, batch), params)
    lg = jax.lax.stop_gradient(logits).astype(_f32)
    labels = jax.random.categorical(key, lg, axis=-1)
    # d mean_CE / d logits = (softmax - onehot(y_hat)) / B at unmasked positions.
    dlogits = jax.nn.softmax(lg, axis=-1) - jax.nn.one_hot(labels, lg.shape[-1], dtype=_f32)
    if mask is None:
        count = jnp.asarray(float(math.prod(lg.shape[:-1])), _f32)
        dlogits = dlogits / count
    else:
        weights = jnp.asarray(mask, _f32)
        count = jnp.sum(weights)
        dlogits = dlogits * (weights / jnp.maximum(count, 1.0))[..., None]
    (g_hat,) = vjp_fn(dlogits.astype(logits.dtype))
    g_hat = jax.tree.map(lambda g: g.astype(_f32), g_hat)
    if max_norm is not None:
        norm = optax.tree.norm(g_hat)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
        g_hat = jax.tree.map(lambda g: g * scale, g_hat)
    return jax.tree.map(lambda g: count * g * g, g_hat)


# ---------------------------------------------------------------------------
# hutchinson_precond and clip_by_ratio
# ---------------------------------------------------------------------------


class HutchinsonPrecondState(NamedTuple):
    """State of `hutchinson_precond`.

    Attributes:
      count: number of updates so far (int32).
      h: EMA of the Hessian-diagonal estimate, float32, a tree like the params.
      key: PRNG key (``uint32[2]``) of the internal estimator (``obj_fn=``).
    """

    count: jax.Array
    h: Any
    key: jax.Array


def _check_int_like(fn: str, arg: str, value: Any, minimum: int) -> None:
    """An int >= minimum; 0-d integer arrays (as `optax.inject_hyperparams` passes) too."""
    if isinstance(value, (jax.Array, np.ndarray)) and getattr(value, "shape", None) == ():
        if not jnp.issubdtype(value.dtype, jnp.integer):
            raise ValueError(f"{fn}: {arg}={value!r} must be an int >= {minimum}")
        try:
            value = int(value)
        except Exception:  # a tracer: checked when the factory was first built
            return
    V.check_int(fn, arg, value, minimum=minimum)


def _resolve(official_code_form, eps, hessian_update_order, refresh_phase, update_every):
    if eps is None:
        eps = _OFFICIAL_EPS if official_code_form else _CANONICAL_EPS
    if hessian_update_order is None:
        hessian_update_order = "after" if official_code_form else "before"
    if refresh_phase is None:
        refresh_phase = 0 if hessian_update_order == "before" else update_every - 1
    return eps, hessian_update_order, refresh_phase


def _validate_precond(
    fn, b2, rho, eps, update_every, batch_size, hessian_update_order, refresh_phase, distribution
):
    V.check_beta(fn, "b2", b2)
    V.check_nonnegative(fn, "rho", rho)
    if eps is not None:
        V.check_positive(fn, "eps", eps)
    _check_int_like(fn, "update_every", update_every, 1)
    if batch_size is not None:
        _check_int_like(fn, "batch_size", batch_size, 1)
    if hessian_update_order is not None:
        V.check_choice(fn, "hessian_update_order", hessian_update_order, HESSIAN_UPDATE_ORDERS)
    if refresh_phase is not None:
        _check_int_like(fn, "refresh_phase", refresh_phase, 0)
        if isinstance(refresh_phase, int) and isinstance(update_every, int):
            if refresh_phase >= update_every:
                raise ValueError(
                    f"{fn}: refresh_phase={refresh_phase!r} must be < update_every={update_every}"
                )
    V.check_choice(fn, "distribution", distribution, DISTRIBUTIONS)


def _align(hessian_diag: Any, updates: Any) -> Any:
    """``hessian_diag`` restricted to the leaves ``updates`` holds.

    Inside `optax.partition` / `optax.masked` the transform sees updates whose
    other groups' leaves are `optax.MaskedNode`. The estimate may come for the
    full param tree (partition's default) or already masked
    (``mask_compatible_extra_args=True``); both are reduced to the updates'
    structure here.
    """
    return jax.tree.map(
        lambda u, h: u if _is_masked(u) else h, updates, hessian_diag, is_leaf=_is_masked
    )


def hutchinson_precond(
    *,
    b2: float = 0.99,
    rho: float = 0.01,
    eps: float | None = None,
    update_every: int = 10,
    official_code_form: bool = False,
    batch_size: int | None = None,
    hessian_update_order: str | None = None,
    refresh_phase: int | None = None,
    distribution: str = "rademacher",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Sophia's preconditioner: divides the updates by ``max(gamma * h, eps)``.

    ``h`` is an EMA of a diagonal Hessian estimate ``h_hat``,
    ``h <- b2 * h + (1 - b2) * h_hat`` (no bias correction), refreshed only on
    the steps where an estimate is available; ``gamma = rho * batch_size``
    (``rho`` when ``batch_size`` is None). Per coordinate the output is
    ``u / max(gamma * h, eps)``, or with ``official_code_form=True``
    ``u / (gamma * max(h, 0) + eps)`` (the official SophiaG code's additive
    form, identical to it for ``h >= 0``; the ``max(h, 0)`` keeps a negative
    Hutchinson ``h`` from flipping the step). Follow it with
    `clip_by_ratio`.

    ``update(updates, state, params=None, *, hessian_diag=None, obj_fn=None)``:

    * ``hessian_diag``: a fresh estimate (a tree like the params, e.g. from
      `gnb_diag` or `hutchinson_diag`). When given, ``h`` is refreshed with it;
      with ``hessian_update_order="before"`` (canonical) the refreshed ``h`` is
      used for this very step, with ``"after"`` (official SophiaG loop,
      `optax.contrib.sophia`) this step still uses the old ``h``. Inside
      `optax.partition` the estimate may be given for the full param tree or
      already partitioned. An estimate with a NaN/Inf is ignored (``h`` keeps
      its value).
    * ``obj_fn``: ``params -> scalar loss``; used only when ``hessian_diag`` is
      None. Then the transform computes a Hutchinson estimate itself (probe
      ``distribution``, PRNG key kept in the state) on the steps where
      ``count % update_every == refresh_phase``, under `jax.lax.cond` (jit-safe,
      one compilation). Needs the full ``params`` (not inside
      `optax.partition`).
    * neither: ``h`` is left as is and only used.

    The caller chooses the refresh steps when it passes ``hessian_diag``; use
    `is_refresh_step` with the same ``update_every``/order/phase. Steps before
    the first refresh see ``h = 0`` and give ``u / eps`` (a sign step after
    clipping).

    Args:
      b2: EMA rate of ``h``.
      rho: ``gamma`` of the paper (0.01 for Sophia-H, 0.04 for Sophia-G).
      eps: floor of the denominator; None means 1e-12 (max form) or 1e-15
        (official additive form).
      update_every: ``k``, the refresh interval of the internal estimator and
        the schedule `is_refresh_step` gives.
      official_code_form: additive ``eps`` and, unless set explicitly,
        ``hessian_update_order="after"``.
      batch_size: ``bs`` of the official code (tokens per step). Give it when
        ``hessian_diag`` is the official ``g_hat**2`` without the ``B``
        factor; leave None with `gnb_diag`, whose estimate already includes
        ``B``.
      hessian_update_order: ``"before"`` or ``"after"``; None means
        ``"after"`` with ``official_code_form`` and ``"before"`` otherwise.
      refresh_phase: the internal estimator refreshes when
        ``count % update_every == refresh_phase`` (``count`` = number of
        previous updates); None means 0 for ``"before"`` (steps 1, k+1, ...)
        and ``update_every - 1`` for ``"after"`` (after steps k, 2k, ..., as in
        the official loop, so steps 1..k are sign-momentum steps). optax's
        contrib Sophia is ``"after"`` with phase 0.
      distribution: probe of the internal estimator, ``"rademacher"`` or
        ``"gaussian"``.
      seed: seed of the internal estimator's PRNG key.

    Returns:
      A `optax.GradientTransformationExtraArgs` with state
      `HutchinsonPrecondState`; updates come back in their input dtype.

    References:
      Liu et al., arXiv:2305.14342, Algorithm 3.
    """
    fn = "hutchinson_precond"
    _validate_precond(
        fn,
        b2,
        rho,
        eps,
        update_every,
        batch_size,
        hessian_update_order,
        refresh_phase,
        distribution,
    )
    eps, order, phase = _resolve(
        official_code_form, eps, hessian_update_order, refresh_phase, update_every
    )
    gamma = rho if batch_size is None else rho * batch_size

    def denominator(h):
        if official_code_form:
            return gamma * jnp.maximum(h, 0.0) + eps
        return jnp.maximum(gamma * h, eps)

    def refresh(h, h_hat):
        h_hat = jax.tree.map(lambda x: jnp.asarray(x).astype(_f32), h_hat)
        leaves = jax.tree.leaves(h_hat)
        if not leaves:
            return h
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        new = jax.tree.map(lambda e, old: (1 - b2) * e + b2 * old, h_hat, h)
        return jax.tree.map(lambda a, old: jnp.where(finite, a, old).astype(_f32), new, h)

    def init_fn(params):
        return HutchinsonPrecondState(
            count=jnp.zeros([], jnp.int32),
            h=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _f32), params),
            key=jax.random.PRNGKey(seed),
        )

    def update_fn(updates, state, params=None, *, hessian_diag=None, obj_fn=None, **extra_args):
        del extra_args
        key = state.key
        if hessian_diag is not None:
            new_h = refresh(state.h, _align(hessian_diag, updates))
        elif obj_fn is not None:
            if params is None or any(
                _is_masked(x) for x in jax.tree.leaves(params, is_leaf=_is_masked)
            ):
                raise ValueError(
                    f"{fn}: obj_fn= needs the full params; inside optax.partition pass "
                    "hessian_diag= (e.g. from optim_transforms.hutchinson_diag) instead"
                )

            def estimate(h, key):
                key, sub = jax.random.split(key)
                return refresh(h, _hutchinson(obj_fn, params, sub, distribution)), key

            new_h, key = jax.lax.cond(
                state.count % update_every == phase,
                estimate,
                lambda h, key: (h, key),
                state.h,
                state.key,
            )
        else:
            new_h = state.h
        h_used = new_h if order == "before" else state.h
        out = jax.tree.map(
            lambda u, h: (u.astype(_f32) / denominator(h)).astype(u.dtype), updates, h_used
        )
        count = optax.safe_int32_increment(state.count)
        return out, HutchinsonPrecondState(count=count, h=new_h, key=key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ClipByRatioState(NamedTuple):
    """State of `clip_by_ratio(report_win_rate=True)`.

    Attributes:
      win_rate: fraction of coordinates (over all leaves) of the last update
        with ``|r| < threshold``, i.e. not clipped.
    """

    win_rate: jax.Array


def clip_by_ratio(
    *, threshold: float = 1.0, report_win_rate: bool = False
) -> optax.GradientTransformation:
    """Element-wise clip of the preconditioned ratio to ``[-threshold, threshold]``.

    Stateless (``optax.EmptyState``) unless ``report_win_rate``: then the state
    holds the fraction of unclipped coordinates of the last update, counted
    over all elements of all leaves. Sophia's tuning rule: pick ``rho`` so that
    this fraction stays in 0.1-0.5.

    Args:
      threshold: the clip bound (1 in Sophia).
      report_win_rate: keep the win rate in the state.

    Returns:
      A `optax.GradientTransformation`; updates keep their dtype.

    References:
      Liu et al., arXiv:2305.14342, Algorithm 3.
    """
    V.check_positive("clip_by_ratio", "threshold", threshold)

    def init_fn(params):
        del params
        if report_win_rate:
            return ClipByRatioState(win_rate=jnp.zeros([], _f32))
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        out = jax.tree.map(lambda u: jnp.clip(u, -threshold, threshold).astype(u.dtype), updates)
        if not report_win_rate:
            return out, state
        leaves = jax.tree.leaves(updates)
        total = sum(x.size for x in leaves)
        inside = sum(jnp.sum(jnp.abs(x.astype(_f32)) < threshold) for x in leaves)
        return out, ClipByRatioState(win_rate=jnp.asarray(inside, _f32) / max(total, 1))

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Named optimizers
# ---------------------------------------------------------------------------


class SophiaMomentumState(NamedTuple):
    """State of Sophia's momentum: ``count`` (int32) and ``m`` (float32, like the params)."""

    count: jax.Array
    m: Any


def _momentum(b1: float, bias_correction: bool) -> optax.GradientTransformation:
    """``m <- b1 m + (1 - b1) g`` in float32; returns ``m`` (or ``m / (1 - b1^t)``)."""

    def init_fn(params):
        return SophiaMomentumState(
            count=jnp.zeros([], jnp.int32),
            m=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _f32), params),
        )

    def update_fn(updates, state, params=None):
        del params
        m = jax.tree.map(lambda g, t: (1 - b1) * g.astype(_f32) + b1 * t, updates, state.m)
        m = jax.tree.map(lambda t: t.astype(_f32), m)
        count = optax.safe_int32_increment(state.count)
        out = m
        if bias_correction:
            corr = (1 - jnp.asarray(b1, _f32) ** count).astype(_f32)
            out = jax.tree.map(lambda t: t / corr, m)
        out = jax.tree.map(lambda t, g: t.astype(g.dtype), out, updates)
        return out, SophiaMomentumState(count=count, m=m)

    return optax.GradientTransformation(init_fn, update_fn)


def _decay_matrices(params: Any) -> Any:
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _sophia(
    fn: str,
    learning_rate,
    *,
    b1,
    b2,
    rho,
    eps,
    weight_decay,
    weight_decay_mask,
    update_every,
    official_code_form,
    batch_size,
    hessian_update_order,
    refresh_phase,
    bias_correction,
    distribution,
    seed,
    cautious,
    skip_nonfinite,
):
    V.check_learning_rate(fn, learning_rate)
    V.check_beta(fn, "b1", b1)
    V.check_nonnegative(fn, "weight_decay", weight_decay)
    _validate_precond(
        fn,
        b2,
        rho,
        eps,
        update_every,
        batch_size,
        hessian_update_order,
        refresh_phase,
        distribution,
    )
    inner = optax.chain(
        _momentum(b1, bias_correction),
        hutchinson_precond(
            b2=b2,
            rho=rho,
            eps=eps,
            update_every=update_every,
            official_code_form=official_code_form,
            batch_size=batch_size,
            hessian_update_order=hessian_update_order,
            refresh_phase=refresh_phase,
            distribution=distribution,
            seed=seed,
        ),
        clip_by_ratio(threshold=1.0),
    )
    tx = optax.chain(
        maybe_cautious(inner, cautious),
        optax.add_decayed_weights(
            weight_decay, _decay_matrices if weight_decay_mask is None else weight_decay_mask
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
    return V.finalize(tx, skip_nonfinite=skip_nonfinite)


_NAMED_DOC = """
    Per coordinate, with ``g`` the gradient and ``h`` the EMA of the Hessian
    diagonal estimate passed as ``update(..., hessian_diag=...)``::

        m <- b1 m + (1 - b1) g                      (no bias correction)
        h <- b2 h + (1 - b2) h_hat                  (on refresh steps)
        u  = clip(m / max(rho h, eps), -1, 1)
        theta <- theta - lr wd theta - lr u         (decay never clipped)

    Chain: momentum -> `hutchinson_precond` -> `clip_by_ratio` (wrapped in
    `cautious_mask` when ``cautious``) -> ``add_decayed_weights`` ->
    ``scale_by_learning_rate``, finally `optax.apply_if_finite` when
    ``skip_nonfinite``. Steps without ``hessian_diag`` only use ``h``; the
    training loop passes it every ``update_every`` steps (`is_refresh_step`,
    `sophia_step_fns`). All params are optimized (as in the official GPT-2
    code); weight decay applies to params with ``ndim >= 2`` unless
    ``weight_decay_mask`` says otherwise. Inside `optax.partition` (e.g. with
    AdamW on 1-D params) pass ``hessian_diag`` for the full param tree.

    Args:
      learning_rate: float or optax schedule (``eta``).
      b1: momentum rate.
      b2: EMA rate of the Hessian estimate.
      rho: ``gamma`` of the paper (scale of ``h`` in the denominator).
      eps: floor of the denominator; None means 1e-12 (max form) or 1e-15
        (``official_code_form``).
      weight_decay: decoupled weight decay ``wd`` (multiplied by the lr).
      weight_decay_mask: tree/callable as in `optax.add_decayed_weights`;
        None decays the params with ``ndim >= 2``.
      update_every: ``k``, the Hessian refresh interval.
      official_code_form: the official SophiaG code's update:
        ``u = clip(m / (rho * bs * h + 1e-15), -1, 1)`` (additive eps) with
        the Hessian refreshed after the update on steps k, 2k, ..., so steps
        1..k are sign-momentum steps ``lr * sign(m)``.
      batch_size: the official ``bs``: give it when ``hessian_diag`` is
        ``g_hat**2`` without the token-count factor; None when the estimate
        comes from `gnb_diag` (which multiplies by ``B``).
      hessian_update_order: ``"before"`` (canonical: refresh, then use) or
        ``"after"`` (official code, `optax.contrib.sophia`); None picks it
        from ``official_code_form``.
      refresh_phase: see `hutchinson_precond` (0 with ``"after"`` is
        `optax.contrib.sophia`'s schedule).
      bias_correction: divide ``m`` by ``1 - b1^t`` (as `optax.contrib.sophia`
        does; the paper and official code do not).
      distribution: probe of the internal Hutchinson estimator (``obj_fn=``).
      seed: seed of the internal estimator's PRNG key.
      cautious: mask the clipped ratio where its sign disagrees with the
        gradient (`cautious_mask`), before weight decay.
      skip_nonfinite: skip steps whose gradient has a NaN/Inf.

    Returns:
      A `optax.GradientTransformationExtraArgs`.

    References:
      Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order
      Optimizer for Language Model Pre-training", arXiv:2305.14342.
"""


def sophia_h(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.01,
    eps: float | None = None,
    weight_decay: float = 0.1,
    weight_decay_mask: Any = None,
    update_every: int = 10,
    official_code_form: bool = False,
    batch_size: int | None = None,
    hessian_update_order: str | None = None,
    refresh_phase: int | None = None,
    bias_correction: bool = False,
    distribution: str = "rademacher",
    seed: int = 0,
    cautious: bool = False,
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
    return _sophia("sophia_h", **locals())


def sophia_g(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    eps: float | None = None,
    weight_decay: float = 0.1,
    weight_decay_mask: Any = None,
    update_every: int = 10,
    official_code_form: bool = False,
    batch_size: int | None = None,
    hessian_update_order: str | None = None,
    refresh_phase: int | None = None,
    bias_correction: bool = False,
    distribution: str = "rademacher",
    seed: int = 0,
    cautious: bool = False,
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
    return _sophia("sophia_g", **locals())


sophia_h.__doc__ = (
    """Sophia-H: Sophia with a Hutchinson estimate of the Hessian diagonal.

    Feed ``hessian_diag=optim_transforms.hutchinson_diag(loss_fn, params,
    batch, key)`` on refresh steps, or, as with `optax.contrib.sophia`,
    ``obj_fn=lambda p: loss(p, batch)`` on every step (the estimate is then
    computed internally on refresh steps; needs the full params).
"""
    + _NAMED_DOC
)
sophia_g.__doc__ = (
    """Sophia-G: Sophia with the Gauss-Newton-Bartlett estimate of the Hessian diagonal.

    Feed ``hessian_diag=optim_transforms.gnb_diag(logits_fn, params, batch,
    key)`` on refresh steps (``B * g_hat**2`` with labels sampled from the
    model).
"""
    + _NAMED_DOC
)


# ---------------------------------------------------------------------------
# Training-loop glue
# ---------------------------------------------------------------------------


def is_refresh_step(
    step: Any,
    update_every: int = 10,
    *,
    hessian_update_order: str = "before",
    refresh_phase: int | None = None,
) -> Any:
    """Whether the train step with 0-based index ``step`` passes a fresh estimate.

    ``step % update_every == refresh_phase``, where the phase defaults to 0 for
    ``"before"`` (steps 0, k, 2k, ...: the estimate is used at once) and to
    ``k - 1`` for ``"after"`` (steps k-1, 2k-1, ...: the official SophiaG loop
    folds the estimate in after its k-th update). Works on Python ints (use it
    on the host to pick the jitted function) and on jax integers.
    """
    V.check_choice(
        "is_refresh_step", "hessian_update_order", hessian_update_order, HESSIAN_UPDATE_ORDERS
    )
    phase = resolve_refresh_phase(
        update_every, hessian_update_order=hessian_update_order, refresh_phase=refresh_phase
    )
    return step % update_every == phase


def resolve_refresh_phase(
    update_every: int,
    *,
    official_code_form: bool = False,
    hessian_update_order: str | None = None,
    refresh_phase: int | None = None,
) -> int:
    """The 0-based ``step % update_every`` on which a Sophia optimizer takes its estimate.

    Resolves the same way `sophia_h` / `sophia_g` do: ``hessian_update_order``
    defaults to ``"after"`` in the official code's form and ``"before"``
    otherwise; the phase defaults to 0 for ``"before"`` and ``update_every - 1``
    for ``"after"``. Training loops use it to pick the refresh steps.
    """
    _, _, phase = _resolve(
        official_code_form, 1.0, hessian_update_order, refresh_phase, update_every
    )
    return int(phase)


class SophiaStepFns(NamedTuple):
    """Two jitted train steps for Sophia, and which one to run when.

    Attributes:
      step: ``(params, opt_state, batch, key) -> (params, opt_state, loss)``,
        a plain step (no Hessian estimate; ``key`` unused).
      refresh_step: the same, plus the Hessian-diagonal estimate passed to
        ``tx.update`` as ``hessian_diag=``.
      update_every: the refresh interval ``k``.
      refresh_phase: refresh when ``i % k == refresh_phase``.
    """

    step: Callable[..., Any]
    refresh_step: Callable[..., Any]
    update_every: int
    refresh_phase: int

    def __call__(self, i: int, params, opt_state, batch, key):
        """Runs train step ``i`` (a Python int, 0-based) with the right function."""
        if i % self.update_every == self.refresh_phase:
            return self.refresh_step(params, opt_state, batch, key)
        return self.step(params, opt_state, batch, key)


def sophia_step_fns(
    loss_fn: Callable[[Any, Any], jax.Array],
    tx: optax.GradientTransformation,
    hessian_fn: Callable[[Any, Any, jax.Array], Any],
    *,
    update_every: int = 10,
    hessian_update_order: str = "before",
    refresh_phase: int | None = None,
    donate: bool = False,
) -> SophiaStepFns:
    """A plain and a refresh train step: at most two compilations per shapes.

    Passing ``hessian_diag=None`` or a tree changes what ``tx.update`` traces,
    so the loop keeps two jitted functions and picks one on the host::

        fns = sophia_step_fns(loss_fn, tx, functools.partial(gnb_diag, logits_fn))
        for i, batch in enumerate(batches):
            params, opt_state, loss = fns(i, params, opt_state, batch, keys[i])

    Each function compiles once; the estimator runs only in ``refresh_step``
    (one extra forward/backward for GNB every ``update_every`` steps), so
    nothing is wasted on the other steps (a `jax.lax.cond` inside one step
    would also work, but under `jax.vmap` or with some sharding it evaluates
    both branches).

    Args:
      loss_fn: ``(params, batch) -> scalar`` training loss.
      tx: the optimizer (e.g. `sophia_g`), updated as
        ``tx.update(grads, opt_state, params[, hessian_diag=...])``.
      hessian_fn: ``(params, batch, key) -> tree like params``, e.g.
        ``functools.partial(gnb_diag, logits_fn)`` or
        ``functools.partial(hutchinson_diag, loss_fn)``.
      update_every, hessian_update_order, refresh_phase: the schedule of
        `is_refresh_step`; use the values the optimizer was built with.
      donate: donate params and optimizer state to the jitted steps.

    Returns:
      A `SophiaStepFns`; call it as ``fns(i, params, opt_state, batch, key)``.
    """
    _check_int_like("sophia_step_fns", "update_every", update_every, 1)
    V.check_choice(
        "sophia_step_fns", "hessian_update_order", hessian_update_order, HESSIAN_UPDATE_ORDERS
    )
    _, _, phase = _resolve(False, 1.0, hessian_update_order, refresh_phase, update_every)

    def run(params, opt_state, batch, key, refresh):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        extra = {"hessian_diag": hessian_fn(params, batch, key)} if refresh else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss

    donate_argnums = (0, 1) if donate else ()
    step = jax.jit(lambda p, s, b, k: run(p, s, b, k, False), donate_argnums=donate_argnums)
    refresh_step = jax.jit(lambda p, s, b, k: run(p, s, b, k, True), donate_argnums=donate_argnums)
    return SophiaStepFns(step, refresh_step, int(update_every), int(phase))
