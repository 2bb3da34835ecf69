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

__all__ = ["cautious_mask", "cautious_adamw", "cautious_lion", "maybe_cautious", "NORMALIZATIONS"]

NORMALIZATIONS = ("mean_clamp", "count_plus_one", "none")


def _validate(normalization: str, min_fraction: float) -> None:
    V.check_choice("cautious_mask", "normalization", normalization, NORMALIZATIONS)
    if (
        isinstance(min_fraction, bool)
        or not isinstance(min_fraction, (int, float))
        or not 0.0 < min_fraction <= 1.0
    ):
        raise ValueError(f"cautious_mask: min_fraction={min_fraction!r} must be in (0, 1]")


def _mask_leaf(u: jax.Array, g: jax.Array, normalization: str, min_fraction: float) -> jax.Array:
    """``kappa * u * phi`` for one leaf; ``phi`` and ``kappa`` reduce over all its axes, in fp32."""
    phi = (u.astype(jnp.float32) * g.astype(jnp.float32)) > 0
    phi_f = phi.astype(jnp.float32)
    if normalization == "mean_clamp":
        kappa = 1.0 / jnp.maximum(jnp.mean(phi_f), min_fraction)
    elif normalization == "count_plus_one":
        kappa = phi_f.size / (jnp.sum(phi_f) + 1.0)
    else:
        kappa = jnp.float32(1.0)
    return (u.astype(jnp.float32) * phi_f * kappa).astype(u.dtype)


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
    the moments are updated unmasked and weight decay is never masked.

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
        cautious_mask(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), normalization=normalization),
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
        cautious_mask(optax.scale_by_lion(b1=b1, b2=b2), normalization=normalization),
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
