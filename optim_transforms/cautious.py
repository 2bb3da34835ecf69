"""Cautious optimizers: mask update coordinates that disagree with the gradient.

References:
  Liang, Chen, Liu, Liu. "Cautious Optimizers: Improving Training with One
  Line of Code", arXiv:2411.16085.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optim_transforms import validate as V

__all__ = [
    "cautious_mask",
    "scale_by_cautious_adam",
    "scale_by_cautious_lion",
    "cautious_adamw",
    "cautious_lion",
    "maybe_cautious",
    "NORMALIZATIONS",
]

NORMALIZATIONS = ("mean_clamp", "count_plus_one", "none")


def _validate(normalization: str, min_fraction: Any) -> None:
    V.check_choice("cautious_mask", "normalization", normalization, NORMALIZATIONS)
    value = V._concrete(min_fraction)  # 0-d arrays come from inject_hyperparams
    if value is None:
        return
    if not V._is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"cautious_mask: min_fraction={min_fraction!r} must be in (0, 1]")


# A count of a full-size predicate is a reduction: XLA:CPU (jax 0.10) does not
# fuse a compare into a float reduce, so a plain ``mean(phi)`` materializes
# ``phi`` (a full-size temporary, page-faulted in on every call). An int32 sum
# over a trailing axis of at most 32 does fuse its producer (from 64 on, XLA
# rewrites it into a tree reduction that does not); only the 32x smaller partial
# sums are materialized, and the barrier stops XLA from merging the two reduces
# back into one. Measured on a 4096 x 8192 leaf: as fast as a fused float sum
# of ``m * g``; partial axes of 16 and 8 are 8% and 45% slower.
_PARTIAL = (32, 16, 8)


def _count_true(pred: jax.Array) -> jax.Array:
    """Number of ``True`` entries of ``pred`` over all its axes, as int32."""
    k = next((k for k in _PARTIAL if pred.ndim and pred.shape[-1] % k == 0), None)
    if k is None or pred.size < 2**16:
        return jnp.sum(pred, dtype=jnp.int32)
    split = pred.reshape(pred.shape[:-1] + (pred.shape[-1] // k, k))
    partial = jax.lax.optimization_barrier(jnp.sum(split, axis=-1, dtype=jnp.int32))
    return jnp.sum(partial, dtype=jnp.int32)


def _kappa(phi: jax.Array, normalization: str, min_fraction: float) -> jax.Array:
    """The rescale of `cautious_mask` for mask ``phi`` (bool), in float32."""
    if normalization == "none":
        return jnp.float32(1.0)
    count = _count_true(phi).astype(jnp.float32)
    if normalization == "mean_clamp":
        return 1.0 / jnp.maximum(count / phi.size, min_fraction)
    return phi.size / (count + 1.0)


def _apply_mask(u: jax.Array, phi: jax.Array, normalization: str, min_fraction: float) -> jax.Array:
    """``kappa * u`` where ``phi`` else 0, in ``u``'s dtype (masked entries are exactly 0)."""
    kappa = _kappa(phi, normalization, min_fraction)
    return jnp.where(phi, u.astype(jnp.float32) * kappa, 0.0).astype(u.dtype)


def _mask_leaf(u: jax.Array, g: jax.Array, normalization: str, min_fraction: float) -> jax.Array:
    """``kappa * u * phi`` for one leaf; ``phi`` and ``kappa`` reduce over all its axes, in fp32."""
    phi = (u.astype(jnp.float32) * g.astype(jnp.float32)) > 0
    return _apply_mask(u, phi, normalization, min_fraction)


def cautious_mask(
    inner: optax.GradientTransformation,
    *,
    normalization: str = "mean_clamp",
    min_fraction: float = 1e-3,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` and zeroes its update where it disagrees with the gradient.

    With ``g`` the updates that enter the wrapper and ``u = inner(g)``, per leaf:
    ``phi = 1[u * g > 0]`` (strict), and the output is ``kappa * u * phi`` with

    * ``"mean_clamp"`` (default, current reference code):
      ``kappa = 1 / max(mean(phi), min_fraction)``;
    * ``"count_plus_one"`` (the paper's original form):
      ``kappa = numel / (sum(phi) + 1)``;
    * ``"none"``: ``kappa = 1``.

    ``phi`` is element-wise and ``mean``/``sum`` reduce over all axes of the
    leaf (per tensor, so the layout does not matter; under sharding it is the
    global mean, as jit computes it); ``kappa`` is computed in float32 and the
    output has ``u``'s dtype. If every coordinate is masked (e.g. a zero
    gradient) the output is exactly zero, never NaN.

    The mask uses the gradient that entered the wrapper, so the wrapper
    composes at any position of an `optax.chain`. ``inner`` must
    return a direction with the gradient's sign convention (i.e. before the
    negative learning-rate scaling). Place decoupled weight decay after the
    wrapper so it is never masked (the paper never masks it).

    The state is ``inner``'s state, unchanged; extra keyword arguments to
    ``update`` are forwarded to ``inner``.

    Args:
      inner: the transform whose update is masked (e.g. `optax.scale_by_adam`).
      normalization: ``"mean_clamp"``, ``"count_plus_one"`` or ``"none"``.
      min_fraction: clamp of ``mean(phi)`` in the ``"mean_clamp"`` form.

    Returns:
      A `optax.GradientTransformationExtraArgs`.

    References:
      Liang et al., "Cautious Optimizers", arXiv:2411.16085, Algorithm 1.
    """
    _validate(normalization, min_fraction)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return inner.init(params)

    def update_fn(updates, state, params=None, **extra_args: Any):
        new_updates, new_state = inner.update(updates, state, params, **extra_args)
        masked = jax.tree.map(
            lambda u, g: _mask_leaf(u, g, normalization, min_fraction),
            new_updates,
            updates,
        )
        return masked, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_cautious_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    normalization: str = "mean_clamp",
    min_fraction: float = 1e-3,
) -> optax.GradientTransformation:
    """``cautious_mask(optax.scale_by_adam(b1, b2, eps))``, fused.

    The same map and the same state (`optax.ScaleByAdamState`) as the
    composition, computed so that XLA needs no full-size temporary: the mask
    ``phi = 1[u * g > 0]`` of the Adam direction ``u = m_hat / (sqrt(v_hat) + eps)``
    is read off the new first moment, ``phi = 1[m * g > 0]`` (``u`` has the
    sign of ``m``: the bias correction and the denominator are positive), so
    the count that sets ``kappa`` needs no division and the division is done
    once, in the final element-wise pass. (The two can differ only where ``u``
    underflows to 0 while ``m != 0``, which needs a subnormal ``m``.)

    Args:
      b1, b2, eps: as in `optax.scale_by_adam`.
      normalization, min_fraction: as in `cautious_mask`.

    Returns:
      A `optax.GradientTransformation`.

    References:
      Liang et al., "Cautious Optimizers", arXiv:2411.16085;
      Kingma & Ba, "Adam", arXiv:1412.6980.
    """
    _validate(normalization, min_fraction)
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)

        def leaf(g, m, m_hat, v_hat):
            phi = (m.astype(jnp.float32) * g.astype(jnp.float32)) > 0
            return _apply_mask(m_hat / (jnp.sqrt(v_hat) + eps), phi, normalization, min_fraction)

        new_updates = jax.tree.map(leaf, updates, mu, mu_hat, nu_hat)
        return new_updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(adam.init, update_fn)


def scale_by_cautious_lion(
    b1: float = 0.95,
    b2: float = 0.98,
    *,
    normalization: str = "mean_clamp",
    min_fraction: float = 1e-3,
) -> optax.GradientTransformation:
    """``cautious_mask(optax.scale_by_lion(b1, b2))``, fused.

    Same state (`optax.ScaleByLionState`) as the composition. Lion's direction
    ``c = sign(b1 m + (1 - b1) g)`` reads the *old* momentum while the new one
    ``m' = b2 m + (1 - b2) g`` overwrites it, which makes XLA copy the whole
    momentum every step. Here, when ``b1`` and ``b2`` are Python numbers and
    ``b2 > 0``, the direction is read off the new momentum instead:
    ``b2 (b1 m + (1 - b1) g) = b1 m' + (b2 - b1) g``, so
    ``c = sign(b1 m' + (b2 - b1) g)`` — equal in exact arithmetic; in floating
    point the sign can differ only where ``b1 m + (1 - b1) g`` is within
    rounding of zero. With traced (injected) betas the direct form is used.

    Args:
      b1, b2: Lion's interpolation and momentum rates.
      normalization, min_fraction: as in `cautious_mask`.

    Returns:
      A `optax.GradientTransformation`.

    References:
      Liang et al., "Cautious Optimizers", arXiv:2411.16085;
      Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675.
    """
    _validate(normalization, min_fraction)
    lion = optax.scale_by_lion(b1=b1, b2=b2)
    from_new = V._is_number(b1) and V._is_number(b2) and b2 > 0

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b2, 1)

        def leaf(g, m_old, m_new):
            if from_new:
                c = jnp.sign(b1 * m_new + (b2 - b1) * g)
            else:
                c = jnp.sign((1.0 - b1) * g + b1 * m_old)
            phi = (c.astype(jnp.float32) * g.astype(jnp.float32)) > 0
            return _apply_mask(c, phi, normalization, min_fraction)

        new_updates = jax.tree.map(leaf, updates, state.mu, mu)
        mu = optax.tree.cast_like(mu, state.mu)
        count = optax.safe_increment(state.count)
        return new_updates, optax.ScaleByLionState(count=count, mu=mu)

    return optax.GradientTransformation(lion.init, update_fn)


def cautious_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    mask: Any = None,
    normalization: str = "mean_clamp",
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """C-AdamW: AdamW whose Adam direction goes through `cautious_mask`.

    ``chain(cautious_mask(scale_by_adam(b1, b2, eps)),
    add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))``;
    the moments are updated unmasked and weight decay is never masked. The
    first link runs as the fused `scale_by_cautious_adam` (same map, no
    full-size temporaries).

    Args:
      learning_rate: float or optax schedule.
      b1, b2, eps: Adam hyperparameters.
      weight_decay: decoupled weight decay (optax.adamw's default).
      mask: weight-decay mask, as in `optax.adamw`.
      normalization: see `cautious_mask`.
      skip_nonfinite: skip steps whose gradient has a NaN/Inf (see
        `optim_transforms.validate.finalize`).

    Returns:
      A `optax.GradientTransformationExtraArgs`.

    References:
      Liang et al., "Cautious Optimizers", arXiv:2411.16085.
    """
    fn = "cautious_adamw"
    V.check_learning_rate(fn, learning_rate)
    V.check_beta(fn, "b1", b1)
    V.check_beta(fn, "b2", b2)
    V.check_nonnegative(fn, "eps", eps)
    V.check_nonnegative(fn, "weight_decay", weight_decay)
    tx = optax.chain(
        scale_by_cautious_adam(b1, b2, eps, normalization=normalization),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return V.finalize(tx, skip_nonfinite=skip_nonfinite)


def cautious_lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.95,
    b2: float = 0.98,
    weight_decay: float = 1e-3,
    *,
    mask: Any = None,
    normalization: str = "mean_clamp",
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """C-Lion: Lion whose sign direction goes through `cautious_mask`.

    ``c = sign(b1 m + (1 - b1) g)`` is masked where ``c * g <= 0`` and
    rescaled; the momentum ``m <- b2 m + (1 - b2) g`` is updated unmasked.
    Runs as ``chain(scale_by_cautious_lion(b1, b2), add_decayed_weights,
    scale_by_learning_rate)`` (see `scale_by_cautious_lion` for how the
    direction is read off the new momentum).

    Args:
      learning_rate: float or optax schedule (3-10x below AdamW's).
      b1, b2: Lion's interpolation and momentum rates (C-Optim defaults).
      weight_decay: decoupled weight decay (optax.lion's default).
      mask: weight-decay mask, as in `optax.lion`.
      normalization: see `cautious_mask`.
      skip_nonfinite: skip steps whose gradient has a NaN/Inf (see
        `optim_transforms.validate.finalize`).

    Returns:
      A `optax.GradientTransformationExtraArgs`.

    References:
      Liang et al., "Cautious Optimizers", arXiv:2411.16085.
    """
    fn = "cautious_lion"
    V.check_learning_rate(fn, learning_rate)
    V.check_beta(fn, "b1", b1)
    V.check_beta(fn, "b2", b2)
    V.check_nonnegative(fn, "weight_decay", weight_decay)
    tx = optax.chain(
        scale_by_cautious_lion(b1, b2, normalization=normalization),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return V.finalize(tx, skip_nonfinite=skip_nonfinite)


def maybe_cautious(
    inner: optax.GradientTransformation, cautious: bool
) -> optax.GradientTransformationExtraArgs:
    """``cautious_mask(inner)`` if ``cautious`` else ``inner`` (with extra-args support).

    The named optimizers use this on the part of their chain that comes before
    weight decay and the learning rate, so ``cautious=True`` never masks decay.
    """
    return cautious_mask(inner) if cautious else optax.with_extra_args_support(inner)
