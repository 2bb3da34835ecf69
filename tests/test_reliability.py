"""Reliability across every registry optimizer (issue 9).

Parametrized over `optim_transforms.names()`, so a new optimizer is covered
automatically:

* property tests (hypothesis): random param trees (0-D to 4-D leaves, size-1
  axes, float32/bfloat16) and random gradients including zeros, tiny (1e-30)
  and huge (1e30) magnitudes give finite updates of the params' dtype/shape;
* NaN/Inf gradients with ``skip_nonfinite`` leave params and the inner state
  bit-identical and are counted;
* bad hyperparameters raise ``ValueError`` naming the argument at construction;
* sharded == unsharded within 1e-6 on the 8-fake-device mesh.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optim_transforms as ot
from optim_transforms import registry
from tests import harness

OURS = sorted(set(ot.names()) - set(registry.BASELINES))
LR = 1e-3

# Hyperparameter name -> a value every factory must reject at construction.
BAD_VALUES = {
    "learning_rate": -1.0,
    "b1": 1.5,
    "b2": -0.1,
    "b3": 1.0,
    "eps": -1.0,
    "weight_decay": -1.0,
    "rho": -1.0,
    "rank": 0,
    "update_every": 0,
    "update_proj_gap": 0,
    "ns_steps": 0,
    "method": "bogus",
    "scale_type": "bogus",
    "clip_threshold": -1.0,
    "gamma": 0.5,
}


def _needs_hessian(name: str) -> bool:
    return name.startswith("sophia")


def _extra(name):
    if not _needs_hessian(name):
        return lambda params, grads, step: {}
    # A positive diagonal estimate, passed on every step.
    return lambda params, grads, step: {
        "hessian_diag": jax.tree.map(lambda g: jnp.abs(g).astype(jnp.float32) + 0.1, grads)
    }


def _build(name, **kw):
    return ot.build(name, learning_rate=LR, **kw)


# ---------------------------------------------------------------------------
# Property tests on random trees and gradients

# Paths chosen so every rank has a matrix view where one applies.
_LEAF_PATHS = {
    0: "scalar",
    1: "norm/scale",
    2: "dense/kernel",
    3: "layers/mlp/kernel",  # scanned (L, in, out)
    4: "layers/attn/q_proj/kernel",  # scanned (L, d, heads, head_dim)
}


@st.composite
def trees(draw):
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    ranks = draw(st.lists(st.integers(0, 4), min_size=1, max_size=4, unique=True))
    params, grads = {}, {}
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    for r in ranks:
        shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 5, 8]), min_size=r, max_size=r)))
        kind = draw(st.sampled_from(["normal", "zeros", "tiny", "huge", "mixed"]))
        g = rng.standard_normal(shape).astype(np.float32)
        if kind == "zeros":
            g = np.zeros(shape, np.float32)
        elif kind == "tiny":
            g = g * 1e-30
        elif kind == "huge":
            g = g * 1e30
        elif kind == "mixed":
            g = g * np.where(rng.random(shape) < 0.5, 1e-30, 1e30).astype(np.float32)
        node_p, node_g = params, grads
        parts = _LEAF_PATHS[r].split("/")
        for part in parts[:-1]:
            node_p = node_p.setdefault(part, {})
            node_g = node_g.setdefault(part, {})
        node_p[parts[-1]] = jnp.asarray(rng.standard_normal(shape), dtype)
        node_g[parts[-1]] = jnp.asarray(g, dtype)
    return params, grads


GENERATED_CASES = 12


@pytest.mark.parametrize("name", ot.names())
@settings(
    max_examples=GENERATED_CASES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(case=trees())
def test_random_trees_give_finite_updates(name, case):
    params, grads = case
    tx = _build(name)
    state = tx.init(params)
    extra = _extra(name)
    for step in range(2):
        updates, state = tx.update(grads, state, params, **extra(params, grads, step))
        for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
            assert u.shape == p.shape and u.dtype == p.dtype
            assert np.all(np.isfinite(np.asarray(u, np.float32))), f"{name}: non-finite update"
        params = optax.apply_updates(params, updates)
    # Second moments store g**2: for |g| > ~1.8e19 that overflows float32 by
    # construction (optax.adamw included), so state finiteness is only
    # required when the squares are representable. Updates must be finite always.
    max_abs = max(float(jnp.max(jnp.abs(g.astype(jnp.float32)))) for g in jax.tree.leaves(grads))
    if max_abs < 1e19:
        for leaf in jax.tree.leaves(state):
            if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
                assert np.all(np.isfinite(np.asarray(leaf, np.float32))), (
                    f"{name}: non-finite state"
                )


# ---------------------------------------------------------------------------
# Non-finite gradients are skipped


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", OURS)
def test_nonfinite_gradient_is_skipped(name, bad):
    tx = _build(name, skip_nonfinite=True)
    params = harness.make_params()
    extra = _extra(name)
    step = jax.jit(lambda g, s, p, kw: tx.update(g, s, p, **kw))
    state = tx.init(params)
    grads = harness.make_grads(params, 0)
    updates, state = step(grads, state, params, extra(params, grads, 0))
    params = optax.apply_updates(params, updates)

    bad_grads = harness.make_grads(params, 1)
    bad_grads["dense"]["kernel"] = bad_grads["dense"]["kernel"].at[1, 2].set(bad)
    kw = extra(params, harness.make_grads(params, 1), 1)
    updates, new_state = step(bad_grads, state, params, kw)
    new_params = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(new_state.inner_state), jax.tree.leaves(state.inner_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(new_state.total_notfinite) == 1
    assert int(new_state.notfinite_count) == 1


# ---------------------------------------------------------------------------
# Construction-time validation


def _bad_cases():
    for name in OURS:
        for arg in inspect.signature(registry.factory(name)).parameters:
            if arg in BAD_VALUES:
                yield name, arg


@pytest.mark.parametrize("name,arg", list(_bad_cases()))
def test_bad_hyperparameter_raises_naming_it(name, arg):
    kw = {"learning_rate": LR, arg: BAD_VALUES[arg]}
    with pytest.raises(ValueError, match=arg):
        ot.build(name, **kw)


@pytest.mark.parametrize("name", OURS)
def test_bool_flags_are_keyword_only(name):
    params = inspect.signature(registry.factory(name)).parameters
    for flag in ("cautious", "skip_nonfinite"):
        if flag in params:
            assert params[flag].kind is inspect.Parameter.KEYWORD_ONLY, f"{name}.{flag}"


# ---------------------------------------------------------------------------
# Sharded == unsharded


@pytest.mark.parametrize("name", ot.names())
def test_sharded_equals_unsharded(name):
    tx = _build(name)
    extra = _extra(name)
    mesh = harness.make_mesh()
    shardings = harness.param_shardings(mesh)

    def run(params, put):
        from optim_transforms.sharding import init_sharded

        state = init_sharded(tx, params, mesh) if put else tx.init(params)
        step = jax.jit(lambda g, s, p, kw: tx.update(g, s, p, **kw))
        for i in range(3):
            grads = harness.make_grads(params, i)
            if put:
                grads = jax.device_put(grads, shardings)
            updates, state = step(grads, state, params, extra(params, grads, i))
            params = optax.apply_updates(params, updates)
        return params

    ref = run(harness.make_params(), put=False)
    got = run(jax.device_put(harness.make_params(), shardings), put=True)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )
