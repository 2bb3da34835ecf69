"""Optimizers and transforms by name.

The factory signature is the one place a hyperparameter and its default are
defined: `hyperparameters` reads it with `inspect.signature`, `build`
validates against it, and the CLIs in `experiments` derive their flags from
it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import optax

from optim_transforms.apollo import apollo, apollo_mini, norm_growth_limiter, random_proj_scale
from optim_transforms.came import came, scale_by_came
from optim_transforms.cautious import (
    cautious_adamw,
    cautious_lion,
    cautious_mask,
    scale_by_cautious_adam,
    scale_by_cautious_lion,
)
from optim_transforms.sophia import clip_by_ratio, hutchinson_precond, sophia_g, sophia_h
from optim_transforms.swan import grad_norm, swan, whiten

__all__ = [
    "OPTIMIZERS",
    "TRANSFORMS",
    "BASELINES",
    "names",
    "factory",
    "hyperparameters",
    "build",
    "transform_names",
    "transform_hyperparameters",
    "build_transform",
]

# Baselines from optax, registered so that every comparison uses one API.
BASELINES: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": optax.adamw,
    "lion": optax.lion,
    "adafactor": optax.adafactor,
    "sgd": optax.sgd,
}

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    **BASELINES,
    "swan": swan,
    "sophia_h": sophia_h,
    "sophia_g": sophia_g,
    "apollo": apollo,
    "apollo_mini": apollo_mini,
    "came": came,
    "cautious_adamw": cautious_adamw,
    "cautious_lion": cautious_lion,
}

# Building blocks for chain specs (`experiments.ordering`): ours and optax's.
TRANSFORMS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "grad_norm": grad_norm,
    "whiten": whiten,
    "hutchinson_precond": hutchinson_precond,
    "clip_by_ratio": clip_by_ratio,
    "random_proj_scale": random_proj_scale,
    "norm_growth_limiter": norm_growth_limiter,
    "cautious_mask": cautious_mask,
    "scale_by_cautious_adam": scale_by_cautious_adam,
    "scale_by_cautious_lion": scale_by_cautious_lion,
    "scale_by_came": scale_by_came,
    "scale_by_adam": optax.scale_by_adam,
    "scale_by_lion": optax.scale_by_lion,
    "scale_by_rms": optax.scale_by_rms,
    "scale_by_factored_rms": optax.scale_by_factored_rms,
    "trace": optax.trace,
    "ema": optax.ema,
    "add_decayed_weights": optax.add_decayed_weights,
    "clip_by_global_norm": optax.clip_by_global_norm,
    "scale": optax.scale,
    "scale_by_learning_rate": optax.scale_by_learning_rate,
    "identity": optax.identity,
}


def _lookup(table: dict[str, Callable[..., Any]], name: str, kind: str) -> Callable[..., Any]:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(table))}")
    return table[name]


def names() -> list[str]:
    """Names of the registered optimizers, sorted."""
    return sorted(OPTIMIZERS)


def transform_names() -> list[str]:
    """Names of the registered transforms (chain building blocks), sorted."""
    return sorted(TRANSFORMS)


def factory(name: str) -> Callable[..., optax.GradientTransformation]:
    """The factory registered under ``name``; `ValueError` if unknown."""
    return _lookup(OPTIMIZERS, name, "optimizer")


def _signature_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[p.name] = p.default
    return out


def hyperparameters(name: str) -> dict[str, Any]:
    """``{hyperparameter: default}`` of optimizer ``name``, from its signature.

    Required arguments (e.g. ``learning_rate``) map to `inspect.Parameter.empty`.
    """
    return _signature_defaults(factory(name))


def transform_hyperparameters(name: str) -> dict[str, Any]:
    """``{argument: default}`` of transform ``name``, from its signature."""
    return _signature_defaults(_lookup(TRANSFORMS, name, "transform"))


def _check_kwargs(fn: Callable[..., Any], what: str, kwargs: dict[str, Any]) -> None:
    valid = _signature_defaults(fn)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"{what}: unknown hyperparameter(s) {unknown}; valid ones: {', '.join(valid)}"
        )
    missing = [k for k, v in valid.items() if v is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ValueError(f"{what}: missing required hyperparameter(s) {missing}")


def build(name: str, **hparams: Any) -> optax.GradientTransformation:
    """Builds optimizer ``name`` with ``hparams``.

    Raises:
      ValueError: unknown name (listing the valid ones), unknown or missing
        hyperparameters (listing the valid ones).
    """
    fn = factory(name)
    _check_kwargs(fn, name, hparams)
    return fn(**hparams)


def build_transform(name: str, *args: Any, **kwargs: Any) -> optax.GradientTransformation:
    """Builds transform ``name`` (see `TRANSFORMS`) with the given arguments."""
    fn = _lookup(TRANSFORMS, name, "transform")
    _check_kwargs(fn, name, {**dict.fromkeys(list(_signature_defaults(fn))[: len(args)]), **kwargs})
    return fn(*args, **kwargs)
