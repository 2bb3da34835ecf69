"""A jitted, sharded train step for `models.llama.Llama` with any optax optimizer.

Params are a pure pytree: ``graphdef, params = nnx.split(model, nnx.Param)``
(the LLaMA has no other state). The step is one `jax.jit` with explicit
`NamedSharding` in/out shardings (params and optimizer state keep their
layout), donated params and state, and traced under the mesh so the model's
activation constraints apply. Sophia's Hessian-diagonal estimate is computed
only in `TrainStep.refresh_step` (a second compiled function) and passed to
``tx.update`` as ``hessian_diag=``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import optim_transforms
from models.sharding import LOGICAL_AXIS_RULES, batch_sharding, logical_to_spec, opt_state_shardings

__all__ = ["loss_fn", "logits_fn", "make_train_step", "TrainStep", "HESSIAN_ESTIMATORS"]

HESSIAN_ESTIMATORS = ("hutchinson", "gnb")


def logits_fn(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """``float32[B, T, vocab]`` logits of ``batch["inputs"]``."""
    return nnx.merge(graphdef, params)(batch["inputs"])


def loss_fn(
    graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy over the (masked) tokens of ``batch``.

    Args:
      graphdef: from ``nnx.split(model, nnx.Param)``.
      params: the param `nnx.State`.
      batch: ``{"inputs": int32[B, T], "targets": int32[B, T]}`` and optionally
        ``"mask": float[B, T]`` (1 for tokens that count).

    Returns:
      ``(loss, {"tokens": number of counted tokens})``; the mean is over the
      batch and time axes, weighted by the mask.
    """
    logits = logits_fn(graphdef, params, batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch.get("mask")
    if mask is None:
        tokens = jnp.asarray(ce.size, jnp.float32)
        return jnp.mean(ce), {"tokens": tokens}
    mask = mask.astype(jnp.float32)
    tokens = jnp.sum(mask)
    return jnp.sum(ce * mask) / jnp.maximum(tokens, 1.0), {"tokens": tokens}


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """Compiled train step(s) for one (graphdef, tx, mesh, param shardings).

    Attributes:
      step: ``(params, opt_state, batch, key) -> (params, opt_state, metrics)``,
        no Hessian estimate; ``key`` is unused there (kept for one signature).
      refresh_step: same signature, also computes the Hessian-diagonal
        estimate and passes it to ``tx.update`` as ``hessian_diag=``; None
        unless ``hessian`` was given.
      init_opt_state: ``params -> opt_state`` sharded like the params.
      compiled_memory: ``(params, opt_state, batch, key) -> memory_analysis()``
        of the compiled `step` (``refresh=True`` for the refresh step).
      param_shardings, state_shardings, batch_sharding: the layouts used.
    """

    step: Callable[..., Any]
    refresh_step: Callable[..., Any] | None
    init_opt_state: Callable[[Any], Any]
    compiled_memory: Callable[..., Any]
    param_shardings: Any
    state_shardings: Any
    batch_sharding: NamedSharding


def _split_micro(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"grad_accum={n} must divide the batch size {x.shape[0]}")
        y = x.reshape(n, x.shape[0] // n, *x.shape[1:])
        spec = logical_to_spec((None, "batch") + (None,) * (x.ndim - 1))
        mesh = jax.sharding.get_abstract_mesh()
        return y if mesh.empty else jax.lax.with_sharding_constraint(y, spec)

    return {k: split(v) for k, v in batch.items()}


def _value_and_grad(graphdef, params, batch, grad_accum: int):
    vg = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
    if grad_accum == 1:
        (loss, aux), grads = vg(graphdef, params, batch)
        return loss, grads
    micro = _split_micro(batch, grad_accum)

    # Token-weighted sum of micro-batch means == the mean over the full batch.
    def body(carry, mb):
        loss_sum, grad_sum, tok_sum = carry
        (loss, aux), grads = vg(graphdef, params, mb)
        n = aux["tokens"]
        grad_sum = jax.tree.map(lambda a, g: a + n * g.astype(jnp.float32), grad_sum, grads)
        return (loss_sum + n * loss, grad_sum, tok_sum + n), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (jnp.zeros((), jnp.float32), zeros, jnp.zeros((), jnp.float32))
    (loss_sum, grad_sum, tok_sum), _ = jax.lax.scan(body, init, micro)
    denom = jnp.maximum(tok_sum, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, params)
    return loss_sum / denom, grads


def _hessian_diag(kind: str, graphdef, params, batch, key):
    if kind == "hutchinson":
        return optim_transforms.hutchinson_diag(
            lambda p, b: loss_fn(graphdef, p, b)[0], params, batch, key
        )
    return optim_transforms.gnb_diag(
        lambda p, b: logits_fn(graphdef, p, b), params, batch, key, mask=batch.get("mask")
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    params: Any,
    *,
    hessian: str | None = None,
    grad_accum: int = 1,
    donate: bool = True,
) -> TrainStep:
    """Builds the jitted train step(s) for ``tx`` on ``mesh``.

    Args:
      graphdef: from ``nnx.split(model, nnx.Param)``.
      tx: any optax transform (e.g. ``optim_transforms.build(name, ...)``).
      mesh: the ``(data, fsdp, tensor)`` mesh the params live on.
      params: the param `nnx.State` (arrays or `jax.ShapeDtypeStruct`s with
        shardings); only shapes and shardings are read.
      hessian: None, ``"hutchinson"`` (`optim_transforms.hutchinson_diag`) or
        ``"gnb"`` (`optim_transforms.gnb_diag`): adds `TrainStep.refresh_step`.
      grad_accum: micro-batches per step (must divide the batch size); the
        gradient is the token-weighted mean over them. The Hessian estimate
        of a refresh step uses the full batch.
      donate: donate params and optimizer state to the step.

    Returns:
      A `TrainStep`. Metrics are ``{"loss", "grad_norm"}`` jax scalars (loss
      before the update; global L2 norm of the gradient over all leaves).
    """
    if hessian is not None and hessian not in HESSIAN_ESTIMATORS:
        raise ValueError(f"hessian={hessian!r} must be None or one of {HESSIAN_ESTIMATORS}")
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum!r} must be an integer >= 1")
    tx = optax.with_extra_args_support(tx)
    p_sh = jax.tree.map(lambda x: x.sharding, params)
    s_sh = opt_state_shardings(tx, params, mesh)
    b_sh = batch_sharding(mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    in_sh = (p_sh, s_sh, b_sh, rep)
    out_sh = (p_sh, s_sh, rep)
    donate_argnums = (0, 1) if donate else ()

    def apply(params, opt_state, batch, grads, loss, extra):
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def step(params, opt_state, batch, key):
        del key
        loss, grads = _value_and_grad(graphdef, params, batch, grad_accum)
        return apply(params, opt_state, batch, grads, loss, {})

    def refresh(params, opt_state, batch, key):
        loss, grads = _value_and_grad(graphdef, params, batch, grad_accum)
        h = _hessian_diag(hessian, graphdef, params, batch, key)
        return apply(params, opt_state, batch, grads, loss, {"hessian_diag": h})

    def jit(fn):
        return jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=donate_argnums)

    jitted = {"step": jit(step)}
    if hessian is not None:
        jitted["refresh"] = jit(refresh)

    def under_mesh(name):
        def call(*args):
            with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
                return jitted[name](*args)

        call.__name__ = name
        call.jitted = jitted[name]
        return call

    init_jit = jax.jit(tx.init, out_shardings=s_sh)

    def init_opt_state(params):
        with jax.set_mesh(mesh):
            return init_jit(params)

    def compiled_memory(params, opt_state, batch, key, *, refresh: bool = False):
        name = "refresh" if refresh else "step"
        with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
            lowered = jitted[name].lower(params, opt_state, batch, key)
        return lowered.compile().memory_analysis()

    return TrainStep(
        step=under_mesh("step"),
        refresh_step=under_mesh("refresh") if hessian is not None else None,
        init_opt_state=init_opt_state,
        compiled_memory=compiled_memory,
        param_shardings=p_sh,
        state_shardings=s_sh,
        batch_sharding=b_sh,
    )
