"""Cautious optimizers: `cautious_mask`, `cautious_adamw`, `cautious_lion`.

Oracles from ALGORITHMS.md §4.4: the step never moves against the gradient
apart from weight decay, the rescale factor is exact, all-masked is pure
weight decay, all-agreeing is exactly the base optimizer, and 20-step parity
with timm (C-AdamW, C-Lion) and pytorch-optimizer (C-Lion, ``count_plus_one``).
Everything is element-wise, so no layout convention is involved.
"""

from __future__ import annotations

import importlib
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optim_transforms as ot
from optim_transforms.cautious import cautious_mask, maybe_cautious
from optim_transforms.validate import finalize
from tests import harness

EPS32 = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------- harness


def _masked_adam(**kw):
    return cautious_mask(optax.scale_by_adam(), **kw)


@pytest.mark.parametrize("check", harness.CHECKS)
@pytest.mark.parametrize(
    "factory, hparams",
    [
        (_masked_adam, {}),
        (ot.cautious_adamw, {"learning_rate": 1e-2}),
        (ot.cautious_lion, {"learning_rate": 1e-3}),
        (ot.scale_by_cautious_adam, {}),
        (ot.scale_by_cautious_lion, {}),
    ],
    ids=[
        "mask(scale_by_adam)",
        "cautious_adamw",
        "cautious_lion",
        "scale_by_cautious_adam",
        "scale_by_cautious_lion",
    ],
)
def test_harness(check, factory, hparams):
    harness.run_check(check, factory, hparams)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"normalization": "mean"}, "normalization"),
        ({"min_fraction": 0.0}, "min_fraction"),
        ({"min_fraction": 1.5}, "min_fraction"),
        ({"min_fraction": True}, "min_fraction"),
    ],
)
def test_cautious_mask_rejects_bad_args(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        cautious_mask(optax.identity(), **kwargs)


@pytest.mark.parametrize(
    "factory, kwargs, arg",
    [
        (ot.cautious_adamw, {"learning_rate": -1.0}, "learning_rate"),
        (ot.cautious_adamw, {"learning_rate": 1e-3, "b1": 1.0}, "b1"),
        (ot.cautious_adamw, {"learning_rate": 1e-3, "b2": -0.1}, "b2"),
        (ot.cautious_adamw, {"learning_rate": 1e-3, "eps": -1.0}, "eps"),
        (ot.cautious_adamw, {"learning_rate": 1e-3, "weight_decay": -1.0}, "weight_decay"),
        (ot.cautious_adamw, {"learning_rate": 1e-3, "normalization": "x"}, "normalization"),
        (ot.cautious_lion, {"learning_rate": -1.0}, "learning_rate"),
        (ot.cautious_lion, {"learning_rate": 1e-3, "b2": 1.0}, "b2"),
        (ot.cautious_lion, {"learning_rate": 1e-3, "weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_named_optimizers_reject_bad_args(factory, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        factory(**kwargs)


# --------------------------------------------------------------------------- sign property

_SHAPES = [(1,), (6,), (4, 5), (2, 3, 4), (17,), (3, 1, 2)]


def _signs_inner(signs):
    """A stateless inner transform: ``u = g * signs`` (a known agree/disagree pattern)."""
    return optax.stateless(lambda g, p: jax.tree.map(lambda x, s: x * s, g, signs))


_INNERS = {
    "scale_by_rms": lambda: optax.scale_by_rms(decay=0.9, eps=1e-8),
    "trace": lambda: optax.trace(decay=0.9),
    "scale_by_amsgrad": lambda: optax.scale_by_amsgrad(),
}


def _chain_with_decay(inner, lr, wd, **kw):
    return optax.chain(
        cautious_mask(inner, **kw), optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr)
    )


def _optimizers(lr, wd, normalization):
    out = {
        "cautious_adamw": ot.cautious_adamw(
            lr, weight_decay=wd, normalization=normalization, skip_nonfinite=False
        ),
        "cautious_lion": ot.cautious_lion(
            lr, weight_decay=wd, normalization=normalization, skip_nonfinite=False
        ),
    }
    for name, make in _INNERS.items():
        out[f"mask({name})"] = _chain_with_decay(make(), lr, wd, normalization=normalization)
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from(_SHAPES),
    steps=st.integers(1, 6),
    lr=st.sampled_from([1e-3, 1e-1, 1.0]),
    wd=st.sampled_from([0.0, 1e-2, 0.5]),
    normalization=st.sampled_from(["mean_clamp", "count_plus_one", "none"]),
    zero_frac=st.sampled_from([0.0, 0.3]),
)
def test_never_moves_against_gradient(seed, shape, steps, lr, wd, normalization, zero_frac):
    """(dtheta_i + lr*wd*theta_i) * g_i <= 0 for every coordinate of every step.

    With wd = 0 the check is exact (rounding of theta + update keeps the sign of
    the update). With wd > 0 the masked coordinates give exactly 0 in real
    arithmetic, so the float64 check allows the rounding of the float32 step:
    4 ulps of |theta| and |dtheta|.
    """
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=shape), jnp.float32)}
    for name, tx in _optimizers(lr, wd, normalization).items():
        p = params
        state = tx.init(p)
        for _ in range(steps):
            g = rng.normal(size=shape) * 10.0 ** rng.uniform(-4, 1)
            g[rng.random(shape) < zero_frac] = 0.0
            grads = {"w": jnp.asarray(g, jnp.float32)}
            updates, state = tx.update(grads, state, p)
            new_p = optax.apply_updates(p, updates)
            theta = np.asarray(p["w"], np.float64)
            dtheta = np.asarray(new_p["w"], np.float64) - theta
            gg = np.asarray(grads["w"], np.float64)
            lhs = (dtheta + lr * wd * theta) * gg
            tol = 0.0 if wd == 0 else 4 * EPS32 * (np.abs(theta) + np.abs(dtheta)) * np.abs(gg)
            assert np.all(lhs <= tol), (name, float(np.max(lhs - tol)))
            p = new_p


# --------------------------------------------------------------------------- rescale factor


def _hand_made(n, agree):
    """g = 1 everywhere; u = g * signs with ``agree`` leading +1 entries, the rest -1."""
    signs = np.full((n,), -1.0, np.float32)
    signs[:agree] = 1.0
    g = np.ones((n,), np.float32)
    return {"w": jnp.asarray(g)}, {"w": jnp.asarray(signs)}


@pytest.mark.parametrize(
    "n, agree, normalization, intended",
    [
        (8, 2, "mean_clamp", 4.0),  # mean 1/4
        (8, 8, "mean_clamp", 1.0),
        (8, 2, "count_plus_one", 8.0 / 3.0),
        (8, 7, "count_plus_one", 1.0),
        (8, 2, "none", 1.0),
        (4000, 1, "mean_clamp", 1000.0),  # mean 2.5e-4 < 1e-3: clamped
        (4000, 4, "mean_clamp", 1000.0),  # mean exactly 1e-3
        (4000, 8, "mean_clamp", 500.0),
        (4000, 3, "count_plus_one", 1000.0),
    ],
)
def test_rescale_factor_exact(n, agree, normalization, intended):
    """Survivors are scaled by exactly the float32 value of the formula; the rest are 0."""
    f32 = np.float32
    if normalization == "mean_clamp":
        kappa = f32(1) / max(f32(agree) / f32(n), f32(1e-3))
    elif normalization == "count_plus_one":
        kappa = f32(n) / (f32(agree) + f32(1))
    else:
        kappa = f32(1)
    np.testing.assert_allclose(kappa, intended, rtol=1e-6)  # the case is what it says
    g, signs = _hand_made(n, agree)
    tx = cautious_mask(_signs_inner(signs), normalization=normalization)
    out, _ = tx.update(g, tx.init(g), g)
    expected = np.zeros((n,), np.float32)
    expected[:agree] = kappa
    np.testing.assert_array_equal(np.asarray(out["w"]), expected)


def test_rescale_factor_min_fraction():
    g, signs = _hand_made(10, 1)  # mean 0.1
    out, _ = cautious_mask(_signs_inner(signs), min_fraction=0.5).update(g, (), g)
    np.testing.assert_array_equal(np.asarray(out["w"])[:2], [2.0, 0.0])


@pytest.mark.parametrize("normalization", ["mean_clamp", "count_plus_one", "none"])
def test_all_masked_is_zero_not_nan(normalization):
    g, signs = _hand_made(16, 0)
    out, _ = cautious_mask(_signs_inner(signs), normalization=normalization).update(g, (), g)
    np.testing.assert_array_equal(np.asarray(out["w"]), np.zeros((16,), np.float32))


@pytest.mark.parametrize("factory", [ot.cautious_adamw, ot.cautious_lion])
@pytest.mark.parametrize("normalization", ["mean_clamp", "count_plus_one"])
def test_zero_gradient_is_pure_weight_decay(factory, normalization):
    """g = 0 masks everything: the step is exactly -lr * wd * theta, finite."""
    lr, wd = 0.1, 0.3
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)}
    tx = factory(lr, weight_decay=wd, normalization=normalization)
    decay_only = optax.chain(optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(zeros, state, params)
        expected, _ = decay_only.update(zeros, decay_only.init(params), params)
        np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(expected["w"]))
        params = optax.apply_updates(params, updates)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("normalization", ["mean_clamp", "none"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_identity_inner_is_identity(normalization, dtype):
    rng = np.random.default_rng(3)
    g = {
        "a": jnp.asarray(rng.normal(size=(7, 3)), dtype),
        "b": jnp.asarray(rng.normal(size=(5,)) + 0.5, dtype),
        "c": jnp.asarray(2.5, dtype),
    }
    g = jax.tree.map(lambda x: jnp.where(x == 0, jnp.ones_like(x), x), g)
    tx = cautious_mask(optax.identity(), normalization=normalization)
    out, _ = tx.update(g, tx.init(g), g)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _same_sign_grads(rng, shape, steps):
    """Gradients whose sign per coordinate never changes, so momentum always agrees."""
    signs = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return [
        {"w": jnp.asarray(signs * (0.1 + rng.random(shape)), jnp.float32)} for _ in range(steps)
    ]


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_all_agreeing_is_exactly_adamw(skip_nonfinite):
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
    kw = {"b1": 0.8, "b2": 0.95, "eps": 1e-6, "weight_decay": 0.1}
    ours = ot.cautious_adamw(0.05, **kw, skip_nonfinite=skip_nonfinite)
    # Same wrapping on both sides, so both run the same compiled program structure.
    base = finalize(optax.adamw(0.05, **kw), skip_nonfinite=skip_nonfinite)
    _assert_same_trajectory(ours, base, params, _same_sign_grads(rng, (6, 4), 8))


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_all_agreeing_is_exactly_lion(skip_nonfinite):
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(9,)), jnp.float32)}
    ours = ot.cautious_lion(0.01, b1=0.9, b2=0.99, weight_decay=0.2, skip_nonfinite=skip_nonfinite)
    base = finalize(
        optax.lion(0.01, b1=0.9, b2=0.99, weight_decay=0.2), skip_nonfinite=skip_nonfinite
    )
    _assert_same_trajectory(ours, base, params, _same_sign_grads(rng, (9,), 8))


def _assert_same_trajectory(tx_a, tx_b, params, grads_seq):
    pa, pb = params, params
    sa, sb = tx_a.init(params), tx_b.init(params)
    for grads in grads_seq:
        ua, sa = tx_a.update(grads, sa, pa)
        ub, sb = tx_b.update(grads, sb, pb)
        np.testing.assert_array_equal(np.asarray(ua["w"]), np.asarray(ub["w"]))
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    np.testing.assert_array_equal(np.asarray(pa["w"]), np.asarray(pb["w"]))


# --------------------------------------------------------------------------- extra args


def _scale_by_kwarg():
    """An ExtraArgs transform that needs the keyword ``factor``."""

    def update(updates, state, params=None, *, factor):
        return jax.tree.map(lambda u: u * factor, updates), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def test_extra_args_are_forwarded():
    g = {"w": jnp.asarray([1.0, -2.0, 3.0, 4.0])}
    tx = cautious_mask(_scale_by_kwarg())
    with pytest.raises(TypeError, match="factor"):
        tx.update(g, tx.init(g), g)
    out, _ = tx.update(g, tx.init(g), g, factor=2.0)
    np.testing.assert_array_equal(np.asarray(out["w"]), [2.0, -4.0, 6.0, 8.0])
    # A negative factor disagrees everywhere: all masked.
    out, _ = tx.update(g, tx.init(g), g, factor=-2.0)
    np.testing.assert_array_equal(np.asarray(out["w"]), np.zeros(4, np.float32))
    # Inside a chain (which forwards extra args), and under jit.
    chained = optax.chain(tx, optax.scale_by_learning_rate(0.5))
    out, _ = jax.jit(lambda g, s: chained.update(g, s, g, factor=2.0))(g, chained.init(g))
    np.testing.assert_array_equal(np.asarray(out["w"]), [-1.0, 2.0, -3.0, -4.0])


def test_plain_inner_ignores_extra_args_and_maybe_cautious():
    g = {"w": jnp.asarray([1.0, -2.0])}
    tx = cautious_mask(optax.identity())
    out, _ = tx.update(g, tx.init(g), g, hessian_diag=None)
    np.testing.assert_array_equal(np.asarray(out["w"]), [1.0, -2.0])
    signs = {"w": jnp.asarray([1.0, -1.0])}
    off = maybe_cautious(_signs_inner(signs), False)
    on = maybe_cautious(_signs_inner(signs), True)
    assert isinstance(off, optax.GradientTransformationExtraArgs)
    np.testing.assert_array_equal(np.asarray(off.update(g, (), g, x=1)[0]["w"]), [1.0, 2.0])
    np.testing.assert_array_equal(np.asarray(on.update(g, (), g, x=1)[0]["w"]), [2.0, 0.0])


# --------------------------------------------------------------------------- ordering, NaN


@pytest.mark.parametrize("normalization", ["mean_clamp", "count_plus_one"])
def test_chain_equals_cautious_adamw(normalization):
    lr, wd = 3e-2, 0.05
    chain = optax.chain(
        cautious_mask(optax.scale_by_adam(b1=0.9, b2=0.99, eps=1e-7), normalization=normalization),
        optax.add_decayed_weights(wd),
        optax.scale_by_learning_rate(lr),
    )
    named = ot.cautious_adamw(
        lr,
        b1=0.9,
        b2=0.99,
        eps=1e-7,
        weight_decay=wd,
        normalization=normalization,
        skip_nonfinite=False,
    )
    params = harness.make_params()
    grads_seq = [harness.make_grads(params, i) for i in range(3)]
    pa, pb = params, params
    sa, sb = chain.init(params), named.init(params)
    step_a = jax.jit(lambda g, s, p: chain.update(g, s, p))
    step_b = jax.jit(lambda g, s, p: named.update(g, s, p))
    for grads in grads_seq:
        ua, sa = step_a(grads, sa, pa)
        ub, sb = step_b(grads, sb, pb)
        for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    for x, y in zip(jax.tree.leaves((pa, sa)), jax.tree.leaves((pb, sb))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("factory", [ot.cautious_adamw, ot.cautious_lion])
def test_nonfinite_gradient_is_skipped(factory):
    tx = factory(1e-2, skip_nonfinite=True)
    params = harness.make_params()
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for i in range(2):
        updates, state = step(harness.make_grads(params, i), state, params)
        params = optax.apply_updates(params, updates)
    bad = harness.make_grads(params, 5)
    bad["dense"]["kernel"] = bad["dense"]["kernel"].at[1, 2].set(jnp.nan)
    updates, new_state = step(bad, state, params)
    new_params = optax.apply_updates(params, updates)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(new_state.inner_state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(new_state.notfinite_count) == 1 and int(new_state.total_notfinite) == 1
    # The next finite step proceeds from the untouched state.
    updates, _ = step(harness.make_grads(params, 6), new_state, params)
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))


def test_inject_hyperparams_learning_rate_schedule():
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    tx = optax.inject_hyperparams(ot.cautious_adamw)(learning_rate=sched, weight_decay=0.0)
    params = {"w": jnp.ones((3,))}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.asarray([1.0, -1.0, 2.0])}, state, params)
    # First Adam step is sign(g) (up to eps), all coordinates agree: -lr0 * sign(g).
    np.testing.assert_allclose(np.asarray(updates["w"]), [-1e-2, 1e-2, -1e-2], rtol=1e-6)


# --------------------------------------------------------------------------- PyTorch parity

_SITE = pathlib.Path(optax.__file__).resolve().parents[1]
_PARITY_SHAPES = [(3, 5, 7), (1,), (257,), (33, 12)]
_STEPS = 20


def _import_timm_optim(module: str):
    """Imports ``timm.optim.<module>`` without running ``timm/__init__`` (needs torchvision)."""
    pytest.importorskip("torch")
    root = _SITE / "timm"
    if not (root / "optim" / f"{module}.py").exists():
        pytest.skip("timm is not installed")
    for name, path in (("timm", root), ("timm.optim", root / "optim")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    return importlib.import_module(f"timm.optim.{module}")


def _grad_seq(seed):
    rng = np.random.default_rng(seed)
    return [
        [rng.normal(size=s).astype(np.float32) * 10.0 ** rng.uniform(-2, 0) for s in _PARITY_SHAPES]
        for _ in range(_STEPS)
    ]


def _run_torch(make_opt, params0, grads_seq):
    import torch

    ps = [torch.nn.Parameter(torch.tensor(p)) for p in params0]
    opt = make_opt(ps)
    for grads in grads_seq:
        for p, g in zip(ps, grads):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy() for p in ps]


def _run_ours(tx, params0, grads_seq):
    params = [jnp.asarray(p) for p in params0]
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for grads in grads_seq:
        updates, state = step([jnp.asarray(g) for g in grads], state, params)
        params = optax.apply_updates(params, updates)
    return [np.asarray(p) for p in params]


def _params0(seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in _PARITY_SHAPES]


def _assert_parity(ours, ref, params0):
    for a, b, p0 in zip(ours, ref, params0):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert not np.allclose(a, p0)  # the run moved the params


@pytest.mark.parametrize("foreach", [False, True])
def test_parity_timm_adamw_caution(foreach):
    """timm decays as theta *= 1 - lr*wd before the step; optax adds wd*theta to the update
    before scaling by lr: theta - lr*(u + wd*theta). Same map (u does not depend on theta)."""
    adamw = _import_timm_optim("adamw")
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.99, 1e-8, 0.1
    params0, grads_seq = _params0(0), _grad_seq(1)
    ref = _run_torch(
        lambda ps: adamw.AdamWLegacy(
            ps, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, caution=True, foreach=foreach
        ),
        params0,
        grads_seq,
    )
    ours = _run_ours(
        ot.cautious_adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd), params0, grads_seq
    )
    _assert_parity(ours, ref, params0)
    # Caution matters on these gradients: plain AdamW ends elsewhere.
    plain = _run_ours(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd), params0, grads_seq)
    assert any(np.max(np.abs(a - b)) > 1e-3 for a, b in zip(plain, ref))


@pytest.mark.parametrize("foreach", [False, True])
def test_parity_timm_lion_caution(foreach):
    lion = _import_timm_optim("lion")
    lr, b1, b2, wd = 3e-3, 0.95, 0.98, 0.5
    params0, grads_seq = _params0(2), _grad_seq(3)
    ref = _run_torch(
        lambda ps: lion.Lion(
            ps, lr=lr, betas=(b1, b2), weight_decay=wd, caution=True, foreach=foreach
        ),
        params0,
        grads_seq,
    )
    ours = _run_ours(ot.cautious_lion(lr, b1=b1, b2=b2, weight_decay=wd), params0, grads_seq)
    _assert_parity(ours, ref, params0)
    plain = _run_ours(optax.lion(lr, b1=b1, b2=b2, weight_decay=wd), params0, grads_seq)
    assert any(np.max(np.abs(a - b)) > 1e-3 for a, b in zip(plain, ref))


def test_parity_pytorch_optimizer_lion_count_plus_one():
    """pytorch-optimizer's Lion(cautious=True) rescales by numel / (sum(phi) + 1)."""
    pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    lr, b1, b2, wd = 3e-3, 0.9, 0.99, 0.2
    params0, grads_seq = _params0(4), _grad_seq(5)
    ref = _run_torch(
        lambda ps: po.Lion(ps, lr=lr, betas=(b1, b2), weight_decay=wd, cautious=True),
        params0,
        grads_seq,
    )
    ours = _run_ours(
        ot.cautious_lion(lr, b1=b1, b2=b2, weight_decay=wd, normalization="count_plus_one"),
        params0,
        grads_seq,
    )
    _assert_parity(ours, ref, params0)
    mean_clamp = _run_ours(ot.cautious_lion(lr, b1=b1, b2=b2, weight_decay=wd), params0, grads_seq)
    assert any(np.max(np.abs(a - b)) > 1e-4 for a, b in zip(mean_clamp, ref))


# --------------------------------------------------------------------------- fused forms

# (256, 512) reaches the partial-count path (>= 2**16 entries, last axis % 32 == 0);
# (300, 250) and (7,) take the plain count.
_FUSED_SHAPES = {"a": (256, 512), "b": (300, 250), "c": (7,)}


def _mixed_grads(seed, steps):
    rng = np.random.default_rng(seed)
    return [
        {
            k: jnp.asarray(rng.normal(size=s) * 10.0 ** rng.uniform(-3, 1), jnp.float32)
            for k, s in _FUSED_SHAPES.items()
        }
        for _ in range(steps)
    ]


def _updates_seq(tx, grads_seq):
    params = {k: jnp.zeros(s, jnp.float32) for k, s in _FUSED_SHAPES.items()}
    state, out = tx.init(params), []
    step = jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = step(grads, state, params)
        out.append(updates)
    return out, state


def test_count_true_matches_sum():
    from optim_transforms.cautious import _count_true

    rng = np.random.default_rng(11)
    for shape in [*_FUSED_SHAPES.values(), (4, 64, 1024), (512, 144), (1024, 72), ()]:
        pred = jnp.asarray(rng.uniform(size=shape) < 0.37)
        assert int(jax.jit(_count_true)(pred)) == int(np.sum(np.asarray(pred)))


@pytest.mark.parametrize("normalization", ["mean_clamp", "count_plus_one", "none"])
def test_fused_adam_equals_composition(normalization):
    grads = _mixed_grads(0, 6)
    fused, sf = _updates_seq(
        ot.scale_by_cautious_adam(0.8, 0.95, 1e-6, normalization=normalization), grads
    )
    comp, sc = _updates_seq(
        cautious_mask(optax.scale_by_adam(0.8, 0.95, 1e-6), normalization=normalization), grads
    )
    for uf, uc in zip(fused, comp, strict=True):
        for k in _FUSED_SHAPES:
            np.testing.assert_array_equal(np.asarray(uf[k]), np.asarray(uc[k]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), sf, sc)
    assert type(sf) is type(sc)


@pytest.mark.parametrize("normalization", ["mean_clamp", "count_plus_one"])
def test_fused_lion_equals_composition(normalization):
    """Static betas read the direction off the new momentum: equal up to sign flips where
    b1*m + (1-b1)*g is within rounding of 0 (none expected on these inputs)."""
    b1, b2 = 0.9, 0.99
    grads = _mixed_grads(1, 6)
    fused, sf = _updates_seq(ot.scale_by_cautious_lion(b1, b2, normalization=normalization), grads)
    comp, sc = _updates_seq(
        cautious_mask(optax.scale_by_lion(b1, b2), normalization=normalization), grads
    )
    n_diff = 0
    for uf, uc in zip(fused, comp, strict=True):
        for k in _FUSED_SHAPES:
            n_diff += int(np.sum(np.asarray(uf[k]) != np.asarray(uc[k])))
    assert n_diff == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), sf, sc)


def test_fused_lion_traced_betas_equal_composition():
    grads = _mixed_grads(2, 4)
    fused, _ = _updates_seq(
        optax.inject_hyperparams(ot.scale_by_cautious_lion)(b1=0.9, b2=0.99), grads
    )
    comp, _ = _updates_seq(cautious_mask(optax.scale_by_lion(0.9, 0.99)), grads)
    for uf, uc in zip(fused, comp, strict=True):
        for k in _FUSED_SHAPES:
            np.testing.assert_array_equal(np.asarray(uf[k]), np.asarray(uc[k]))


def test_fused_lion_zero_b2_uses_direct_form():
    """b2 = 0 leaves no old momentum in the new one: the direct form must be used."""
    grads = _mixed_grads(3, 3)
    fused, _ = _updates_seq(ot.scale_by_cautious_lion(0.9, 0.0), grads)
    comp, _ = _updates_seq(cautious_mask(optax.scale_by_lion(0.9, 0.0)), grads)
    for uf, uc in zip(fused, comp, strict=True):
        np.testing.assert_array_equal(np.asarray(uf["a"]), np.asarray(uc["a"]))


@pytest.mark.parametrize(
    "factory", [ot.cautious_adamw, ot.cautious_lion], ids=["cautious_adamw", "cautious_lion"]
)
def test_fused_step_has_no_full_size_temporary(factory):
    """The donated update + apply_updates compiles without a full-size temporary.

    Before the fused forms XLA:CPU kept 2 (C-AdamW) or 2 (C-Lion: a copy of the
    momentum + the mask) full-size buffers per leaf, page-faulted in on every step.
    """
    params = {"w": jnp.zeros((512, 1024), jnp.float32)}
    tx = factory(1e-3)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= params["w"].nbytes // 8, temp


def test_fused_adam_keeps_state_dtypes_under_injected_betas():
    """Injected betas leave the bfloat16 moments bfloat16, as in optax.scale_by_adam."""
    params = {"w": jnp.zeros((8, 4), jnp.bfloat16)}
    grads = {"w": jnp.ones((8, 4), jnp.bfloat16)}
    for make in (ot.scale_by_cautious_adam, optax.scale_by_adam):
        tx = optax.inject_hyperparams(make)(b1=0.9, b2=0.99)
        state = tx.init(params)
        _, new_state = tx.update(grads, state, params)
        assert new_state.inner_state.mu["w"].dtype == jnp.bfloat16, make
        assert new_state.inner_state.nu["w"].dtype == jnp.bfloat16, make
