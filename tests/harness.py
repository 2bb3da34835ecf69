"""One harness every `optax.GradientTransformation` factory of ours goes through.

Usage in a test module::

    @pytest.mark.parametrize("check", harness.CHECKS)
    def test_harness(check):
        harness.run_check(check, optim_transforms.swan, {"learning_rate": 1e-2})

Checks (each a function below):

* ``state_structure``: init/update on a tree with 0-D, 1-D, 2-D, 3-D
  (attention-like, scanned) and size-1 leaves; state structure, shapes and
  dtypes unchanged after 3 steps; updates have the params' shapes.
* ``compiles_once``: a jitted step traces once over 5 steps.
* ``dtypes``: float32 and bfloat16 params give updates of the same dtype,
  all finite.
* ``inject_hyperparams``: works under `optax.inject_hyperparams` with the
  learning rate injected (factories with a ``learning_rate`` argument).
* ``zero_grads_finite``: all-zero gradients give finite updates and state.
* ``sharding``: on a 2x4 mesh of 8 fake CPU devices, updates come out with
  the params' sharding and every state leaf is sharded like its param
  (`optim_transforms.sharding.state_shardings`) or replicated, never left on
  one device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from optim_transforms.sharding import init_sharded, state_shardings

CHECKS = (
    "state_structure",
    "compiles_once",
    "dtypes",
    "inject_hyperparams",
    "zero_grads_finite",
    "sharding",
)

# (shape, PartitionSpec on a ('data', 'fsdp') = (2, 4) mesh), Flax layout.
PARAM_SPECS: dict[str, Any] = {
    "scalar": ((), P()),
    "norm": {"scale": ((8,), P("fsdp"))},
    "embed": {"embedding": ((16, 8), P("data", "fsdp"))},
    "dense": {"kernel": ((8, 12), P("data", "fsdp")), "bias": ((12,), P("fsdp"))},
    # scanned layers: (L, in, out) with a leading layer axis
    "layers": {"mlp": {"kernel": ((2, 8, 4), P(None, "data", "fsdp"))}},
    # DenseGeneral attention kernels: (d, heads, head_dim) and (heads, head_dim, d)
    "attn": {
        "k_proj": {"kernel": ((8, 2, 4), P("fsdp", "data", None))},
        "o_proj": {"kernel": ((2, 4, 8), P("data", None, "fsdp"))},
    },
    "thin": {"kernel": ((1, 8), P(None, "fsdp"))},
    "col": {"kernel": ((8, 1), P("fsdp", None))},
}

ExtraArgsFn = Callable[[Any, Any, Any], dict[str, Any]]


def _is_spec(x):
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], P)


def make_params(dtype=jnp.float32, seed: int = 0) -> Any:
    """The harness param tree (random normal values)."""
    leaves, treedef = jax.tree.flatten(PARAM_SPECS, is_leaf=_is_spec)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    vals = [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, (s, _) in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, vals)


def make_grads(params: Any, seed: int) -> Any:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1000 + seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) for k, x in zip(keys, leaves)],
    )


def make_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def param_shardings(mesh) -> Any:
    return jax.tree.map(lambda sp: NamedSharding(mesh, sp[1]), PARAM_SPECS, is_leaf=_is_spec)


def _no_extra(params, grads, step):
    return {}


def _shape_dtype_tree(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), tree)


def _assert_finite(tree, what):
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        x = (
            np.asarray(jnp.asarray(x, jnp.float32))
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
            else None
        )
        if x is not None:
            assert np.all(np.isfinite(x)), (
                f"{what}: non-finite values at {jax.tree_util.keystr(path)}"
            )


def _run_steps(tx, params, n, extra_args_fn, *, zero=False, jit=True):
    state = tx.init(params)
    step = (
        jax.jit(lambda g, s, p, kw: tx.update(g, s, p, **kw))
        if jit
        else (lambda g, s, p, kw: tx.update(g, s, p, **kw))
    )
    updates = None
    for i in range(n):
        grads = jax.tree.map(jnp.zeros_like, params) if zero else make_grads(params, i)
        updates, state = step(grads, state, params, extra_args_fn(params, grads, i))
        params = optax.apply_updates(params, updates)
    return updates, state, params


def check_state_structure(factory, hparams, extra_args_fn):
    tx = factory(**hparams)
    params = make_params()
    state0 = tx.init(params)
    updates, state3, _ = _run_steps(tx, params, 3, extra_args_fn)
    assert jax.tree.structure(state0) == jax.tree.structure(state3)
    assert _shape_dtype_tree(state0) == _shape_dtype_tree(state3)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert _shape_dtype_tree(updates) == _shape_dtype_tree(params)


def check_compiles_once(factory, hparams, extra_args_fn):
    tx = factory(**hparams)
    traces = []

    @jax.jit
    def step(grads, state, params, kw):
        traces.append(1)
        updates, state = tx.update(grads, state, params, **kw)
        return optax.apply_updates(params, updates), state

    params = make_params()
    state = tx.init(params)
    for i in range(5):
        grads = make_grads(params, i)
        params, state = step(grads, state, params, extra_args_fn(params, grads, i))
    assert len(traces) == 1, f"step traced {len(traces)} times over 5 steps"


def check_dtypes(factory, hparams, extra_args_fn):
    for dtype in (jnp.float32, jnp.bfloat16):
        tx = factory(**hparams)
        params = make_params(dtype)
        updates, state, new_params = _run_steps(tx, params, 2, extra_args_fn)
        for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
            assert u.dtype == p.dtype, f"update dtype {u.dtype} != param dtype {p.dtype}"
        for p0, p1 in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
            assert p1.dtype == p0.dtype
        _assert_finite(updates, f"updates ({jnp.dtype(dtype).name})")
        _assert_finite(state, f"state ({jnp.dtype(dtype).name})")


def check_inject_hyperparams(factory, hparams, extra_args_fn):
    if "learning_rate" not in inspect.signature(factory).parameters:
        return  # a transform without a learning rate has nothing to inject
    tx = optax.inject_hyperparams(factory)(**hparams)
    params = make_params()
    # inject_hyperparams stores numeric hyperparameters (defaults included) as
    # float32: compare against the factory given those float32 values.
    f32 = lambda v: float(np.float32(v)) if isinstance(v, float) else v
    defaults = {
        k: p.default
        for k, p in inspect.signature(factory).parameters.items()
        if isinstance(p.default, float)
    }
    ref = factory(**{k: f32(v) for k, v in {**defaults, **hparams}.items()})
    u_inj, s_inj, _ = _run_steps(tx, params, 2, extra_args_fn)
    u_ref, _, _ = _run_steps(ref, params, 2, extra_args_fn)
    for a, b in zip(jax.tree.leaves(u_inj), jax.tree.leaves(u_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        float(s_inj.hyperparams["learning_rate"]), float(hparams["learning_rate"]), rtol=1e-6
    )
    # Changing the injected rate must change the step (it is really used).
    s_inj.hyperparams["learning_rate"] = jnp.asarray(2 * float(hparams["learning_rate"]))
    grads = make_grads(params, 7)
    u2, _ = tx.update(grads, s_inj, params, **extra_args_fn(params, grads, 2))
    assert any(not np.allclose(np.asarray(a), 0) for a in jax.tree.leaves(u2)), (
        "update is all zeros"
    )


def check_zero_grads_finite(factory, hparams, extra_args_fn):
    tx = factory(**hparams)
    updates, state, _ = _run_steps(tx, make_params(), 3, extra_args_fn, zero=True)
    _assert_finite(updates, "updates for zero gradients")
    _assert_finite(state, "state for zero gradients")


def check_sharding(factory, hparams, extra_args_fn, *, update_layout="same"):
    assert jax.device_count() >= 8, "harness needs 8 fake CPU devices (tests/conftest.py)"
    mesh = make_mesh()
    shardings = param_shardings(mesh)
    tx = factory(**hparams)
    params = jax.device_put(make_params(), shardings)
    state = init_sharded(tx, params, mesh)
    step = jax.jit(lambda g, s, p, kw: tx.update(g, s, p, **kw))
    for i in range(2):
        grads = jax.device_put(make_grads(params, i), shardings)
        updates, state = step(grads, state, params, extra_args_fn(params, grads, i))
    for (path, u), s in zip(
        jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(shardings)
    ):
        if update_layout == "any":
            assert len(u.sharding.device_set) == 8
            continue
        assert u.sharding.is_equivalent_to(s, u.ndim), (
            f"update {jax.tree_util.keystr(path)} has sharding {u.sharding}, param has {s}"
        )
    expected = state_shardings(tx, params, shardings, mesh)
    for (path, x), want in zip(
        jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(expected)
    ):
        where = jax.tree_util.keystr(path)
        assert len(x.sharding.device_set) == 8, (
            f"state {where} is on {len(x.sharding.device_set)} devices"
        )
        assert x.sharding.is_equivalent_to(want, x.ndim), (
            f"state {where} drifted to {x.sharding} after 2 steps; its param's rule gives {want}"
        )


_CHECK_FNS = {name: globals()[f"check_{name}"] for name in CHECKS}


def run_check(
    name: str,
    factory: Callable[..., optax.GradientTransformation],
    hparams: dict[str, Any] | None = None,
    *,
    extra_args_fn: ExtraArgsFn | None = None,
    update_layout: str = "same",
) -> None:
    """Runs harness check ``name`` on ``factory(**hparams)``.

    Args:
      name: one of `CHECKS`.
      factory: a function returning a `GradientTransformation`.
      hparams: keyword arguments for ``factory``.
      extra_args_fn: ``(params, grads, step) -> dict`` of extra keyword
        arguments for ``update`` (e.g. Sophia's ``hessian_diag``).
      update_layout: ``"same"`` (updates must come out with the params'
        sharding) or ``"any"`` (spread over all devices, layout left to XLA).
        ``"any"`` is for transforms whose matmuls on a multi-axis matrix view
        let XLA pick another layout (`whiten`): pinning it with `shard_alike`
        made XLA miscompile a (2, 2, 2) train step (wrong forward loss), and a
        train step's ``out_shardings`` restore the layout anyway.
    """
    fn = _CHECK_FNS[name]
    kw = {"update_layout": update_layout} if name == "sharding" else {}
    fn(factory, dict(hparams or {}), extra_args_fn or _no_extra, **kw)
