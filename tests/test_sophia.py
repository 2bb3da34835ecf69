"""Sophia-H / Sophia-G: estimators, hutchinson_precond, clip_by_ratio, named optimizers.

Oracles from ALGORITHMS.md §2.5; the NumPy references below are written from
the formulas (canonical form) and from the official SophiaG ``step`` /
``update_hessian`` code (official form), in float64.
"""

import functools
import inspect

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import optim_transforms as ot
from optim_transforms import sophia as S
from tests import harness

# ---------------------------------------------------------------------------
# Hutchinson estimator
# ---------------------------------------------------------------------------


def _quadratic(a):
    return lambda p, batch: 0.5 * sum(jnp.sum(a[k] * p[k] ** 2) for k in p)


def test_hutchinson_separable_quadratic_single_rademacher_probe_is_exact():
    rng = np.random.default_rng(0)
    a = {"w": jnp.asarray(rng.uniform(0.5, 3.0, (3, 4)), jnp.float32), "s": jnp.float32(1.7)}
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "s": jnp.float32(0.3)}
    for seed in range(3):
        est = ot.hutchinson_diag(_quadratic(a), params, None, jax.random.key(seed))
        np.testing.assert_allclose(est["w"], a["w"], rtol=1e-6)
        np.testing.assert_allclose(est["s"], a["s"], rtol=1e-6)
        assert est["w"].dtype == jnp.float32


def test_hutchinson_gaussian_probe_mean_within_2_percent():
    a = {"w": jnp.asarray([0.5, 1.0, 2.0, 4.0], jnp.float32)}
    params = {"w": jnp.ones((4,), jnp.float32)}
    keys = jax.random.split(jax.random.key(1), 100_000)
    est = jax.jit(
        jax.vmap(
            lambda k: ot.hutchinson_diag(_quadratic(a), params, None, k, distribution="gaussian")
        )
    )(keys)
    mean = np.asarray(est["w"]).mean(0)
    # a single Gaussian draw is not exact (that is Rademacher's advantage)
    assert np.max(np.abs(np.asarray(est["w"][0]) / np.asarray(a["w"]) - 1)) > 0.01
    np.testing.assert_allclose(mean, a["w"], rtol=0.02)


def test_hutchinson_dense_quadratic_mean_converges_to_diagonal():
    rng = np.random.default_rng(2)
    b = rng.normal(size=(8, 8))
    mat = b @ b.T / 8 + np.eye(8)
    mat32 = jnp.asarray(mat, jnp.float32)

    def loss(p, batch):
        x = p["w"].reshape(-1)
        return 0.5 * x @ mat32 @ x

    params = {"w": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)}
    keys = jax.random.split(jax.random.key(3), 20_000)
    est = jax.jit(jax.vmap(lambda k: ot.hutchinson_diag(loss, params, None, k)))(keys)
    single = np.asarray(est["w"][0]).reshape(-1)
    assert np.max(np.abs(single - np.diag(mat))) > 0.05  # one probe is not exact here
    mean = np.asarray(est["w"]).mean(0).reshape(-1)
    np.testing.assert_allclose(mean, np.diag(mat), rtol=0.05)


def test_hutchinson_nonlinear_tree_matches_exact_hessian_diagonal():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    params = {
        "w": jnp.asarray(0.5 * rng.normal(size=(3, 2)), jnp.float32),
        "b": jnp.asarray(0.1 * rng.normal(size=(2,)), jnp.float32),
    }

    def loss(p, batch):
        xb, yb = batch
        return jnp.mean(jnp.log(jnp.cosh(jnp.tanh(xb @ p["w"] + p["b"][None, :]) * 2.0 - yb)))

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    exact = np.diag(np.asarray(jax.hessian(lambda f: loss(unravel(f), (x, y)))(flat)))
    keys = jax.random.split(jax.random.key(5), 20_000)
    est = jax.jit(jax.vmap(lambda k: ot.hutchinson_diag(loss, params, (x, y), k)))(keys)
    flat = np.asarray(jax.vmap(lambda e: jax.flatten_util.ravel_pytree(e)[0])(est), np.float64)
    # Off-diagonal Hessian mass makes single probes noisy; the sample mean must
    # agree with the exact diagonal within 4 standard errors of the mean.
    stderr = flat.std(0) / np.sqrt(flat.shape[0])
    assert np.all(np.abs(flat.mean(0) - exact) <= 4 * stderr + 1e-7), (flat.mean(0), exact)
    assert np.max(np.abs(flat[0] - exact)) > 4 * np.max(stderr)  # single probes are not exact


# ---------------------------------------------------------------------------
# Gauss-Newton-Bartlett estimator on a tiny softmax regression
# ---------------------------------------------------------------------------

D, VOCAB = 3, 4


def _softmax_regression(seed, tokens):
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(0.3 * rng.normal(size=(D, VOCAB)), jnp.float32),
        "b": jnp.asarray(0.2 * rng.normal(size=(VOCAB,)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(tokens, D)), jnp.float32)
    return params, x


def _logits_fn(p, x):
    z = x @ p["w"]
    return z + p["b"].reshape((1,) * (z.ndim - 1) + (-1,))


def _exact_gn_diag(params, x, mask=None):
    """diag of the Gauss-Newton matrix of the mean CE: (1/B) sum_b J_b^T (diag p - p p^T) J_b."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    mask = np.ones(x.shape[0]) if mask is None else np.asarray(mask)
    total = np.zeros(flat.shape[0])
    for b in range(x.shape[0]):
        xb = x[b]
        jac = np.asarray(jax.jacobian(lambda f, xb=xb: _logits_fn(unravel(f), xb))(flat))  # (V, P)
        p = np.asarray(jax.nn.softmax(_logits_fn(params, x[b])), np.float64)
        cov = np.diag(p) - np.outer(p, p)
        total += mask[b] * np.diag(jac.T @ cov @ jac)
    return total / mask.sum()


def test_gnb_single_token_enumeration_matches_gauss_newton_diagonal():
    params, x = _softmax_regression(0, 1)
    p = np.asarray(jax.nn.softmax(_logits_fn(params, x[0])), np.float64)

    def ce_grad(label):
        g = jax.grad(
            lambda q: optax.softmax_cross_entropy_with_integer_labels(
                _logits_fn(q, x), jnp.asarray([label])
            ).mean()
        )(params)
        return np.asarray(jax.flatten_util.ravel_pytree(g)[0], np.float64)

    per_label = np.stack([ce_grad(y) ** 2 for y in range(VOCAB)])  # B = 1
    enumerated = (p[:, None] * per_label).sum(0)
    np.testing.assert_allclose(enumerated, _exact_gn_diag(params, x), rtol=1e-5, atol=1e-8)

    keys = jax.random.split(jax.random.key(0), 20_000)
    est = jax.jit(jax.vmap(lambda k: ot.gnb_diag(_logits_fn, params, x, k)))(keys)
    flat = np.asarray(jax.vmap(lambda e: jax.flatten_util.ravel_pytree(e)[0])(est), np.float64)
    # every sample is B * g_hat**2 for one label drawn from the model's softmax
    dist = np.abs(flat[:, None, :] - per_label[None]).max(-1)  # (N, V)
    assert np.all(dist.min(1) < 1e-5)
    freq = np.bincount(dist.argmin(1), minlength=VOCAB) / len(keys)
    np.testing.assert_allclose(freq, p, atol=0.015)
    np.testing.assert_allclose(flat.mean(0), enumerated, rtol=0.05)


def test_gnb_batch_with_mask_is_unbiased_for_gauss_newton_diagonal():
    params, x = _softmax_regression(1, 6)
    mask = jnp.asarray([1, 1, 0, 1, 0, 1], jnp.float32)
    keys = jax.random.split(jax.random.key(1), 20_000)
    est = jax.jit(jax.vmap(lambda k: ot.gnb_diag(_logits_fn, params, x, k, mask=mask)))(keys)
    flat = np.asarray(jax.vmap(lambda e: jax.flatten_util.ravel_pytree(e)[0])(est), np.float64)
    np.testing.assert_allclose(flat.mean(0), _exact_gn_diag(params, x, mask), rtol=0.05)
    assert np.all(flat >= 0)
    # B is the unmasked count: 4 masked-in tokens give 4 * g_hat**2
    k = jax.random.key(7)
    g_hat = jax.grad(
        lambda q: (
            jnp.sum(
                mask
                * optax.softmax_cross_entropy_with_integer_labels(
                    _logits_fn(q, x), jax.random.categorical(k, _logits_fn(params, x), axis=-1)
                )
            )
            / 4.0
        )
    )(params)
    one = ot.gnb_diag(_logits_fn, params, x, k, mask=mask)
    for a, g in zip(jax.tree.leaves(one), jax.tree.leaves(g_hat)):
        np.testing.assert_allclose(a, 4.0 * g * g, rtol=1e-5, atol=1e-9)


def test_gnb_max_norm_clips_g_hat_before_squaring():
    params, x = _softmax_regression(2, 5)
    k = jax.random.key(3)
    raw = ot.gnb_diag(_logits_fn, params, x, k)
    g_norm = float(jnp.sqrt(sum(jnp.sum(h / 5.0) for h in jax.tree.leaves(raw))))
    clipped = ot.gnb_diag(_logits_fn, params, x, k, max_norm=0.5 * g_norm)
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(raw)):
        np.testing.assert_allclose(a, 0.25 * b, rtol=1e-5, atol=1e-12)
    same = ot.gnb_diag(_logits_fn, params, x, k, max_norm=2.0 * g_norm)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(raw)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# ---------------------------------------------------------------------------
# sophia_g against float64 NumPy references (canonical and official code)
# ---------------------------------------------------------------------------

T, K = 20, 10
SHAPES = {"w": (4, 5), "v": (2, 3, 2), "bias": (5,)}


def _problem(seed, hess_scale):
    rng = np.random.default_rng(seed)
    theta = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    grads = [{k: rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(T)]
    hhat = [
        {k: hess_scale * rng.uniform(0.0, 2.0, size=s) for k, s in SHAPES.items()} for _ in range(T)
    ]
    return theta, grads, hhat


def _run_jax(tx, theta, grads, hhat, refresh_steps):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), theta)
    state = tx.init(params)
    plain = jax.jit(lambda g, s, p: tx.update(g, s, p))
    fresh = jax.jit(lambda g, s, p, h: tx.update(g, s, p, hessian_diag=h))
    out = []
    for t in range(T):
        g = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), grads[t])
        if t in refresh_steps:
            h = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), hhat[t])
            updates, state = fresh(g, state, params, h)
        else:
            updates, state = plain(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append(jax.tree.map(np.asarray, params))
    return out


def _ref_canonical(theta, grads, hhat, refresh_steps, *, lr, b1, b2, rho, eps, wd):
    """m <- b1 m + (1-b1) g; refresh h before use; u = clip(m / max(rho h, eps), -1, 1)."""
    theta = {k: v.copy() for k, v in theta.items()}
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    h = {k: np.zeros(s) for k, s in SHAPES.items()}
    out, unclipped = [], []
    for t in range(T):
        for k in SHAPES:
            m[k] = b1 * m[k] + (1 - b1) * grads[t][k]
            if t in refresh_steps:
                h[k] = b2 * h[k] + (1 - b2) * hhat[t][k]
            ratio = m[k] / np.maximum(rho * h[k], eps)
            unclipped.append(np.abs(ratio) < 1)
            decay = wd if theta[k].ndim >= 2 else 0.0
            theta[k] = theta[k] - lr * decay * theta[k] - lr * np.clip(ratio, -1, 1)
        out.append({k: v.copy() for k, v in theta.items()})
    return out, np.mean(np.concatenate([u.ravel() for u in unclipped]))


def _ref_official(theta, grads, ghat_sq, *, lr, b1, b2, rho, wd, bs, k):
    """The official SophiaG: ``step(bs)`` every iteration, ``update_hessian()`` when
    ``iter_num % k == k - 1`` (after the step), hessian EMA of ``g_hat**2``."""
    theta = {n: v.copy() for n, v in theta.items()}
    exp_avg = {n: np.zeros(s) for n, s in SHAPES.items()}
    hess = {n: np.zeros(s) for n, s in SHAPES.items()}
    out, unclipped = [], []
    for it in range(T):
        for n in SHAPES:  # optimizer.step(bs=bs)
            decay = wd if theta[n].ndim >= 2 else 0.0  # the 'nodecay' group: 1-D params
            theta[n] *= 1 - lr * decay
            exp_avg[n] = exp_avg[n] * b1 + (1 - b1) * grads[it][n]
            ratio = np.minimum(np.abs(exp_avg[n]) / (rho * bs * hess[n] + 1e-15), 1.0)
            if it >= k:  # the win rate after the first refresh (before it: all clipped)
                unclipped.append(ratio < 1)
            theta[n] += -lr * np.sign(exp_avg[n]) * ratio
        if it % k == k - 1:  # optimizer.update_hessian()
            for n in SHAPES:
                hess[n] = hess[n] * b2 + (1 - b2) * ghat_sq[it][n]
        out.append({n: v.copy() for n, v in theta.items()})
    return out, np.mean(np.concatenate([u.ravel() for u in unclipped]))


def _assert_trajectories(got, want):
    for t, (a, b) in enumerate(zip(got, want)):
        for n in SHAPES:
            np.testing.assert_allclose(a[n], b[n], rtol=0, atol=1e-5, err_msg=f"step {t}, {n}")


def test_sophia_g_canonical_matches_numpy_reference_over_20_steps():
    hp = dict(b1=0.965, b2=0.99, rho=0.04, weight_decay=0.1)
    theta, grads, hhat = _problem(0, hess_scale=100.0)
    refresh = {t for t in range(T) if S.is_refresh_step(t, K)}
    assert refresh == {0, 10}
    want, win = _ref_canonical(
        theta, grads, hhat, refresh, lr=0.05, b1=0.965, b2=0.99, rho=0.04, eps=1e-12, wd=0.1
    )
    assert 0.2 < win < 0.9, win  # both clipped and unclipped coordinates occur
    got = _run_jax(ot.sophia_g(0.05, **hp), theta, grads, hhat, refresh)
    _assert_trajectories(got, want)


@pytest.mark.parametrize("estimate_has_b", [False, True])
def test_sophia_g_official_form_matches_official_code_over_20_steps(estimate_has_b):
    bs = 64
    theta, grads, ghat_sq = _problem(1, hess_scale=3.0)
    want, win = _ref_official(
        theta, grads, ghat_sq, lr=0.05, b1=0.965, b2=0.99, rho=0.04, wd=0.1, bs=bs, k=K
    )
    assert 0.2 < win < 0.9, win
    refresh = {t for t in range(T) if S.is_refresh_step(t, K, hessian_update_order="after")}
    assert refresh == {9, 19}
    if estimate_has_b:  # gnb_diag's convention: B * g_hat**2, no batch_size
        tx = ot.sophia_g(0.05, official_code_form=True)
        est = [jax.tree.map(lambda a: bs * a, h) for h in ghat_sq]
    else:  # the official convention: g_hat**2 and bs in the denominator
        tx = ot.sophia_g(0.05, official_code_form=True, batch_size=bs)
        est = ghat_sq
    _assert_trajectories(_run_jax(tx, theta, grads, est, refresh), want)


def test_official_form_first_k_steps_are_sign_momentum_steps():
    lr, wd = 0.01, 0.1
    theta, grads, hhat = _problem(2, hess_scale=1e4)
    tx = ot.sophia_g(lr, weight_decay=wd, official_code_form=True)
    refresh = {t for t in range(T) if S.is_refresh_step(t, K, hessian_update_order="after")}
    got = _run_jax(tx, theta, grads, hhat, refresh)
    m = {n: np.zeros(s) for n, s in SHAPES.items()}
    prev = theta
    for t in range(K + 1):
        for n in SHAPES:
            m[n] = 0.965 * m[n] + 0.035 * grads[t][n]
            decay = wd if theta[n].ndim >= 2 else 0.0
            step = got[t][n] - prev[n] + lr * decay * prev[n]
            if t < K:
                np.testing.assert_allclose(step, -lr * np.sign(m[n]), rtol=1e-5, atol=1e-7)
            else:  # step k+1 uses the Hessian folded in after step k
                assert np.mean(np.abs(np.abs(step) - lr) > 1e-6) > 0.5
        prev = got[t]
    # The canonical form preconditions from the first step on.
    canon = _run_jax(ot.sophia_g(lr, weight_decay=wd), theta, grads, hhat, {0, 10})
    first = canon[0]["w"] - theta["w"] + lr * wd * theta["w"]
    assert np.mean(np.abs(np.abs(first) - lr) > 1e-6) > 0.5


# ---------------------------------------------------------------------------
# Clip bound, limits, zero Hessian, non-finite estimates
# ---------------------------------------------------------------------------


def test_clip_bound_and_limits():
    lr, wd, rho = 0.03, 0.2, 0.05
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(6, 7)), jnp.float32)}
    tx = ot.sophia_h(lr, rho=rho, weight_decay=wd)
    state = tx.init(params)
    step = jax.jit(lambda g, s, p, h: tx.update(g, s, p, hessian_diag=h))
    for _ in range(15):
        g = {"w": jnp.asarray(rng.normal(size=(6, 7)) * 10 ** rng.uniform(-3, 3), jnp.float32)}
        h = {"w": jnp.asarray(rng.normal(size=(6, 7)) * 10 ** rng.uniform(-2, 4), jnp.float32)}
        u, state = step(g, state, params, h)  # h can be negative (Hutchinson)
        assert np.all(np.abs(u["w"] + lr * wd * params["w"]) <= lr * (1 + 1e-6))
        params = optax.apply_updates(params, u)

    # h = 0: a sign step; gamma h >> |m|: a diagonal Newton step m / (gamma h).
    p0 = {"w": jnp.zeros((2, 3))}
    g = {"w": jnp.asarray([[1e-3, -2.0, 5.0], [-1e-6, 0.3, -7.0]], jnp.float32)}
    tx = ot.sophia_g(lr, weight_decay=0.0, rho=rho)
    u, _ = tx.update(g, tx.init(p0), p0, hessian_diag=jax.tree.map(jnp.zeros_like, g))
    np.testing.assert_allclose(u["w"], -lr * np.sign(g["w"]), rtol=1e-6)
    big = {"w": jnp.full((2, 3), 1e6, jnp.float32)}
    u, _ = tx.update(g, tx.init(p0), p0, hessian_diag=big)
    m = 0.035 * np.asarray(g["w"], np.float64)
    np.testing.assert_allclose(u["w"], -lr * m / (rho * 0.01 * 1e6), rtol=1e-5)

    # m = 0: the step is exactly the weight decay (never clipped).
    p1 = {"w": jnp.asarray(rng.normal(size=(3, 3)) * 100, jnp.float32)}
    tx = ot.sophia_g(lr, weight_decay=wd)
    u, _ = tx.update(
        {"w": jnp.zeros((3, 3))}, tx.init(p1), p1, hessian_diag={"w": jnp.zeros((3, 3))}
    )
    np.testing.assert_allclose(u["w"], -lr * wd * p1["w"], rtol=1e-6)


@pytest.mark.parametrize("official", [False, True])
def test_zero_hessian_and_zero_grads_are_finite(official):
    params, grad_seq, _, _ = _tree_problem()
    tx = ot.sophia_g(1e-2, official_code_form=official)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    step = jax.jit(lambda g, s, p, h: tx.update(g, s, p, hessian_diag=h))
    for grads in (zeros, grad_seq[0]):
        u, state = step(grads, state, params, zeros)
        for x in jax.tree.leaves(u) + jax.tree.leaves(state):
            if jnp.issubdtype(x.dtype, jnp.floating):
                assert np.all(np.isfinite(np.asarray(x)))


def test_nonfinite_estimate_does_not_enter_state():
    params = {"w": jnp.ones((2, 2))}
    tx = ot.hutchinson_precond()
    state = tx.init(params)
    _, state = tx.update(params, state, params, hessian_diag={"w": jnp.full((2, 2), 3.0)})
    bad = {"w": jnp.asarray([[1.0, jnp.nan], [2.0, 3.0]])}
    _, state2 = tx.update(params, state, params, hessian_diag=bad)
    np.testing.assert_array_equal(state2.h["w"], state.h["w"])
    assert int(state2.count) == 2


# ---------------------------------------------------------------------------
# optax.partition
# ---------------------------------------------------------------------------


def _tree_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        },
        "norm": {"scale": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
        "attn": {"kernel": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)},
    }
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        for _ in range(6)
    ]
    hess = [
        jax.tree.map(lambda p: jnp.asarray(rng.uniform(size=p.shape) * 50, p.dtype), params)
        for _ in range(6)
    ]
    labels = jax.tree.map(lambda p: "sophia" if p.ndim >= 2 else "adam", params)
    return params, grads, hess, labels


def _split(tree, labels, which):
    return {
        k: {n: v for n, v in sub.items() if labels[k][n] == which}
        for k, sub in tree.items()
        if any(labels[k][n] == which for n in sub)
    }


def _run(tx, params, grads, hess, *, refresh=(0, 3)):
    state = tx.init(params)
    plain = jax.jit(lambda g, s, p: tx.update(g, s, p))
    fresh = jax.jit(lambda g, s, p, h: tx.update(g, s, p, hessian_diag=h))
    for t, g in enumerate(grads):
        if t in refresh:
            u, state = fresh(g, state, params, hess[t])
        else:
            u, state = plain(g, state, params)
        params = optax.apply_updates(params, u)
    return params


def _user_sophia_chain(lr):
    return optax.chain(
        optax.ema(0.965, debias=False),
        ot.hutchinson_precond(rho=0.04),
        ot.clip_by_ratio(),
        optax.add_decayed_weights(0.1),
        optax.scale_by_learning_rate(lr),
    )


@pytest.mark.parametrize("mask_extra", [False, True])
@pytest.mark.parametrize("named", [False, True])
def test_inside_optax_partition_with_adamw_on_1d_params(named, mask_extra):
    """The estimate is given for the full tree (partition's default) or already
    partitioned (``mask_compatible_extra_args=True``); both match running the
    Sophia part alone on its sub-tree."""
    params, grads, hess, labels = _tree_problem()
    sophia = ot.sophia_g(0.02) if named else _user_sophia_chain(0.02)
    adam = optax.adamw(1e-2)
    tx = optax.partition(
        {"sophia": sophia, "adam": adam}, labels, mask_compatible_extra_args=mask_extra
    )
    got = _run(tx, params, grads, hess)

    sub = lambda trees, which: [_split(x, labels, which) for x in trees]  # noqa: E731
    want_s = _run(
        ot.sophia_g(0.02) if named else _user_sophia_chain(0.02),
        _split(params, labels, "sophia"),
        sub(grads, "sophia"),
        sub(hess, "sophia"),
    )
    want_a = _run(adam, _split(params, labels, "adam"), sub(grads, "adam"), sub(hess, "adam"))
    for which, want in (("sophia", want_s), ("adam", want_a)):
        for k, leaves in want.items():
            for n, v in leaves.items():
                np.testing.assert_allclose(got[k][n], v, rtol=1e-6, atol=1e-7, err_msg=which)
    # the Sophia part really used the estimates (without them it would take sign steps)
    no_hess = _run(tx, params, grads, hess, refresh=())
    assert not np.allclose(no_hess["dense"]["kernel"], got["dense"]["kernel"], atol=1e-4)


def test_obj_fn_inside_partition_raises():
    params, grads, _, labels = _tree_problem()
    tx = optax.partition({"sophia": ot.sophia_h(0.01), "adam": optax.adamw(1e-2)}, labels)
    with pytest.raises(ValueError, match="obj_fn"):
        tx.update(grads[0], tx.init(params), params, obj_fn=lambda p: 0.0)


# ---------------------------------------------------------------------------
# optax.contrib.sophia: the compatible configuration, and the documented differences
# ---------------------------------------------------------------------------


def _regression_problem():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 2)), jnp.float32)
    params = {
        "w1": jnp.asarray(0.5 * rng.normal(size=(6, 5)), jnp.float32),
        "b1": jnp.zeros((5,), jnp.float32),
        "w2": jnp.asarray(0.5 * rng.normal(size=(5, 2)), jnp.float32),
    }

    def loss(p):
        return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"] - y) ** 2)

    return params, loss


def test_optax_contrib_compatible_configuration_matches_contrib_sophia():
    """bias_correction + 'after' order at phase 0 + contrib's eps/gamma/decay and
    the internal Hutchinson estimator (same keys) reproduce optax.contrib.sophia."""
    params, loss = _regression_problem()
    ours = ot.sophia_h(
        1e-2,
        rho=0.01,
        eps=1e-8,
        weight_decay=1e-4,
        weight_decay_mask=lambda p: jax.tree.map(lambda _: True, p),
        bias_correction=True,
        hessian_update_order="after",
        refresh_phase=0,
    )
    theirs = optax.contrib.sophia(1e-2)

    def run(tx):
        p, s = params, tx.init(params)
        step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, obj_fn=loss))
        out = []
        for _ in range(25):  # refreshes after steps 1, 11, 21
            u, s = step(p, s)
            p = optax.apply_updates(p, u)
            out.append(p)
        return out

    for t, (a, b) in enumerate(zip(run(ours), run(theirs))):
        for n in a:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-5, atol=1e-7, err_msg=f"{t} {n}")


def _given_hessian():
    """A hessian_diagonal_fn for optax.contrib.sophia that returns the estimate passed in."""

    def update(updates, state, params=None, *, hessian_diag=None, **kw):
        return hessian_diag, state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def test_documented_differences_from_optax_contrib_sophia():
    lr, b1, b2, rho = 1.0, 0.965, 0.99, 0.01
    p = {"w": jnp.zeros((3,))}
    g = {"w": jnp.asarray([0.5, -1.0, 1e-10], jnp.float32)}
    hhat = {"w": jnp.asarray([1e6, 1e6, 0.0], jnp.float32)}
    contrib = optax.contrib.sophia(
        lr, b1=b1, b2=b2, gamma=rho, weight_decay=0.0, hessian_diagonal_fn=_given_hessian()
    )
    ours = ot.sophia_h(lr, b1=b1, b2=b2, rho=rho, weight_decay=0.0)
    sc, so = contrib.init(p), ours.init(p)
    uc1, sc = contrib.update(g, sc, p, hessian_diag=hhat)
    uo1, so = ours.update(g, so, p, hessian_diag=hhat)

    # 1. Order: contrib refreshes h after the update, so its first step sees
    #    h = 0 and is a sign step; ours refreshes first and preconditions.
    np.testing.assert_allclose(uc1["w"][:2], -lr * np.sign(g["w"][:2]))
    m1 = (1 - b1) * np.asarray(g["w"], np.float64)
    h1 = (1 - b2) * 1e6
    np.testing.assert_allclose(uo1["w"][:2], -lr * m1[:2] / (rho * h1), rtol=1e-5)

    # 2. eps: where h = 0 and |m| is tiny, contrib's max(., 1e-8) gives a small
    #    unclipped step m_hat / 1e-8; our 1e-12 floor gives a full sign step.
    np.testing.assert_allclose(uc1["w"][2], -lr * 1e-10 / 1e-8, rtol=1e-4)
    np.testing.assert_allclose(uo1["w"][2], -lr, rtol=1e-6)

    # 3. Bias correction: with the same h (both refreshed once) and no
    #    clipping, contrib's step is ours divided by (1 - b1^t).
    uc2, _ = contrib.update(g, sc, p, hessian_diag=hhat)  # count 1: not used by contrib
    uo2, _ = ours.update(g, so, p)
    ratio = np.asarray(uc2["w"][:2]) / np.asarray(uo2["w"][:2])
    np.testing.assert_allclose(ratio, 1 / (1 - b1**2), rtol=1e-5)
    assert np.all(np.abs(uo2["w"][:2]) < lr)  # unclipped

    # 4. Defaults: contrib decays with 1e-4 and eps 1e-8; ours with 0.1 and 1e-12.
    sig_c = inspect.signature(optax.contrib.sophia).parameters
    assert sig_c["weight_decay"].default == 1e-4 and sig_c["eps"].default == 1e-8
    sig_o = inspect.signature(ot.sophia_h).parameters
    assert sig_o["weight_decay"].default == 0.1 and sig_o["eps"].default is None
    assert S._CANONICAL_EPS == 1e-12


# ---------------------------------------------------------------------------
# Internal estimator (obj_fn), training-loop glue
# ---------------------------------------------------------------------------


def test_obj_fn_path_compiles_once_and_refreshes_on_schedule():
    params, loss = _regression_problem()
    tx = ot.hutchinson_precond(update_every=4)
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        return tx.update(jax.grad(loss)(p), s, p, obj_fn=loss)

    state = tx.init(params)
    changed = []
    for _ in range(10):
        _, new = step(params, state)
        changed.append(not np.array_equal(new.h["w1"], state.h["w1"]))
        state = new
    assert len(traces) == 1
    assert changed == [c % 4 == 0 for c in range(10)]
    expected_key = jax.random.PRNGKey(0)
    for _ in range(3):  # split once per refresh (counts 0, 4, 8)
        expected_key = jax.random.split(expected_key)[0]
    np.testing.assert_array_equal(state.key, expected_key)


def test_is_refresh_step():
    assert [i for i in range(25) if S.is_refresh_step(i, 10)] == [0, 10, 20]
    after = [i for i in range(25) if S.is_refresh_step(i, 10, hessian_update_order="after")]
    assert after == [9, 19]
    assert [i for i in range(7) if S.is_refresh_step(i, 3, refresh_phase=1)] == [1, 4]
    assert bool(S.is_refresh_step(jnp.int32(20), 10))


def test_train_loop_alternating_refresh_compiles_exactly_twice():
    params, x = _softmax_regression(3, 8)
    targets = jnp.arange(8) % VOCAB
    batch = {"x": x, "y": targets}

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(_logits_fn(p, b["x"]), b["y"]).mean()

    hessian_calls = []

    def hessian_fn(p, b, key):
        hessian_calls.append(1)
        return ot.gnb_diag(lambda q, bb: _logits_fn(q, bb["x"]), p, b, key)

    k = 3
    tx = ot.sophia_g(0.05, update_every=k)
    fns = S.sophia_step_fns(loss_fn, tx, hessian_fn, update_every=k)
    state = tx.init(params)
    keys = jax.random.split(jax.random.key(0), 7)
    p = params
    for i in range(7):  # refresh steps 0, 3, 6
        p, state, loss = fns(i, p, state, batch, keys[i])
    assert fns.step._cache_size() == 1 and fns.refresh_step._cache_size() == 1
    assert len(hessian_calls) == 1  # traced once, in refresh_step only

    # The same loop written out by hand.
    update = jax.jit(tx.update)
    q, s = params, tx.init(params)
    for i in range(7):
        g = jax.grad(loss_fn)(q, batch)
        extra = {"hessian_diag": hessian_fn(q, batch, keys[i])} if i % k == 0 else {}
        u, s = update(g, s, q, **extra)
        q = optax.apply_updates(q, u)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(loss) < float(loss_fn(params, batch))


# ---------------------------------------------------------------------------
# Flags, validation, registry
# ---------------------------------------------------------------------------


def test_cautious_masks_ratio_where_it_disagrees_with_gradient():
    p = {"w": jnp.zeros((2, 4))}
    g1 = {"w": jnp.asarray([[1.0, 1.0, -1.0, -1.0], [2.0, 2.0, -2.0, -2.0]], jnp.float32)}
    g2 = {"w": jnp.asarray([[-0.1, 0.1, 0.1, -0.1], [-0.1, 0.1, 0.1, -0.1]], jnp.float32)}
    plain = ot.sophia_g(1.0, weight_decay=0.0)
    caut = ot.sophia_g(1.0, weight_decay=0.0, cautious=True)
    outs = []
    for tx in (plain, caut):
        s = tx.init(p)
        _, s = tx.update(g1, s, p)
        u, _ = tx.update(g2, s, p)  # momentum keeps g1's sign; g2 disagrees on half
        outs.append(np.asarray(u["w"]))
    np.testing.assert_allclose(outs[0], -np.sign(g1["w"]))
    agree = np.sign(g1["w"]) == np.sign(g2["w"])
    assert np.all(outs[1][~agree] == 0)
    np.testing.assert_allclose(outs[1][agree], 2.0 * outs[0][agree])  # 1 / mean(phi) = 2


def test_win_rate_report():
    tx = ot.clip_by_ratio(threshold=1.0, report_win_rate=True)
    u = {"a": jnp.asarray([0.5, -2.0, 0.9]), "b": jnp.asarray([[3.0], [-0.1]])}
    out, state = tx.update(u, tx.init(u))
    np.testing.assert_allclose(out["a"], [0.5, -1.0, 0.9])
    np.testing.assert_allclose(float(state.win_rate), 3 / 5)
    assert ot.clip_by_ratio().init(u) == optax.EmptyState()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": 1e-3, "b1": 1.0}, "b1"),
        ({"learning_rate": 1e-3, "b2": -0.1}, "b2"),
        ({"learning_rate": 1e-3, "rho": -1.0}, "rho"),
        ({"learning_rate": 1e-3, "eps": 0.0}, "eps"),
        ({"learning_rate": 1e-3, "update_every": 0}, "update_every"),
        ({"learning_rate": 1e-3, "hessian_update_order": "during"}, "hessian_update_order"),
        ({"learning_rate": 1e-3, "refresh_phase": 10}, "refresh_phase"),
        ({"learning_rate": 1e-3, "batch_size": 0}, "batch_size"),
        ({"learning_rate": 1e-3, "distribution": "uniform"}, "distribution"),
        ({"learning_rate": 1e-3, "weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=f"sophia_g: {match}="):
        ot.sophia_g(**kwargs)


def test_invalid_transform_arguments_raise():
    with pytest.raises(ValueError, match="threshold"):
        ot.clip_by_ratio(threshold=0.0)
    with pytest.raises(ValueError, match="hutchinson_precond: update_every"):
        ot.hutchinson_precond(update_every=2.5)
    with pytest.raises(ValueError, match="distribution"):
        ot.hutchinson_diag(lambda p, b: 0.0, {}, None, jax.random.key(0), distribution="x")


def test_registry_builds_and_defaults():
    tx = ot.build("sophia_g", learning_rate=1e-3, rho=0.05)
    assert tx.init({"w": jnp.ones((2, 2))}) is not None
    hp = ot.hyperparameters("sophia_g")
    assert (hp["b1"], hp["b2"], hp["rho"], hp["update_every"]) == (0.965, 0.99, 0.04, 10)
    assert ot.hyperparameters("sophia_h")["rho"] == 0.01


# ---------------------------------------------------------------------------
# Harness (the estimate is passed on every step: the harness compiles one step)
# ---------------------------------------------------------------------------


def _gnb_like(params, grads, step):
    return {"hessian_diag": jax.tree.map(lambda g: g * g, grads)}


def _signed(params, grads, step):
    return {"hessian_diag": jax.tree.map(lambda g: g * jnp.asarray(3.0, g.dtype), grads)}


@pytest.mark.parametrize("check", harness.CHECKS)
def test_harness_sophia_g(check):
    harness.run_check(check, ot.sophia_g, {"learning_rate": 1e-2}, extra_args_fn=_gnb_like)


# The same chain as sophia_g; the structure/sharding/inject checks it shares
# with test_harness_sophia_g run only with -m slow.
_SHARED = ("state_structure", "inject_hyperparams", "sharding")


@pytest.mark.parametrize(
    "check",
    [pytest.param(c, marks=pytest.mark.slow) if c in _SHARED else c for c in harness.CHECKS],
)
def test_harness_sophia_h_official_cautious(check):
    harness.run_check(
        check,
        functools.partial(ot.sophia_h, official_code_form=True, cautious=True),
        {"learning_rate": 1e-2},
        extra_args_fn=_signed,
    )


@pytest.mark.parametrize("check", harness.CHECKS)
def test_harness_hutchinson_precond(check):
    harness.run_check(check, ot.hutchinson_precond, extra_args_fn=_signed)


@pytest.mark.parametrize("check", ["state_structure", "compiles_once", "dtypes", "sharding"])
def test_harness_clip_by_ratio(check):
    harness.run_check(check, ot.clip_by_ratio, {"report_win_rate": True})


@pytest.mark.parametrize(
    "kwargs, phase",
    [
        ({}, 0),
        ({"official_code_form": True}, 9),
        ({"hessian_update_order": "after"}, 9),
        ({"official_code_form": True, "hessian_update_order": "before"}, 0),
        ({"refresh_phase": 2}, 2),
    ],
)
def test_resolve_refresh_phase_matches_is_refresh_step(kwargs, phase):
    from optim_transforms.sophia import is_refresh_step, resolve_refresh_phase

    assert resolve_refresh_phase(10, **kwargs) == phase
    if "official_code_form" not in kwargs:
        hits = [i for i in range(30) if is_refresh_step(i, 10, **kwargs)]
        assert hits == [phase, phase + 10, phase + 20]
