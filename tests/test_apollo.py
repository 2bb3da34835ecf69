"""APOLLO / APOLLO-Mini (ALGORITHMS.md §3): harness, oracles, projections, limiter,
state bytes, and parity with apollo-torch 1.0.3 (``APOLLOAdamW``).

Layout: params are Flax ``(in, out)`` kernels; the maths and apollo-torch use the
PyTorch ``(out, in)`` view, so a kernel ``K`` is compared with ``W = K.T``.
"""

from __future__ import annotations

import functools
import math
import sys
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_transforms as ot
from optim_transforms.matrix import path_names
from optim_transforms.sharding import state_shardings
from tests import harness

B1, B2 = 0.9, 0.999

# ---------------------------------------------------------------------------
# harness


@pytest.mark.parametrize("check", harness.CHECKS)
def test_harness_apollo(check):
    harness.run_check(check, ot.apollo, {"learning_rate": 1e-2, "rank": 2, "weight_decay": 0.1})


# Checks that exercise the same code paths as `apollo`'s are marked slow (~10-20 s of CPU
# each, mostly compiling); CI runs them, `-m "not slow"` skips them locally.
def _slow_unless(fast, checks=harness.CHECKS):
    return [c if c in fast else pytest.param(c, marks=pytest.mark.slow) for c in checks]


@pytest.mark.parametrize(
    "check", _slow_unless(("state_structure", "zero_grads_finite", "sharding"))
)
def test_harness_apollo_mini(check):
    harness.run_check(check, ot.apollo_mini, {"learning_rate": 1e-2})


@pytest.mark.parametrize(
    "check", _slow_unless(("state_structure",), ("state_structure", "dtypes", "sharding"))
)
def test_harness_apollo_cautious(check):
    harness.run_check(check, ot.apollo, {"learning_rate": 1e-2, "rank": 4, "cautious": True})


@pytest.mark.parametrize(
    "check", _slow_unless(("sharding",), ("state_structure", "compiles_once", "sharding"))
)
def test_harness_random_proj_scale(check):
    harness.run_check(check, ot.random_proj_scale, {"rank": 3, "update_proj_gap": 2})


@pytest.mark.parametrize("check", harness.CHECKS)
def test_harness_norm_growth_limiter(check):
    harness.run_check(check, ot.norm_growth_limiter, {})


def test_moments_keep_the_params_sharding_on_the_full_size_axis():
    """Low-rank moments sit in the param's axis order, so the kept axis keeps its mesh axis."""
    mesh = harness.make_mesh()
    params = harness.make_params()
    tx = ot.apollo(1e-2, rank=2)
    specs = state_shardings(tx, params, harness.param_shardings(mesh), mesh)
    found = {}
    for path, s in jax.tree_util.tree_leaves_with_path(specs):
        name = path_names(path)
        if "/moments/" in name and name.endswith("/mu"):
            found[name.split("/moments/")[1].rsplit("/", 2)[0]] = s.spec
    # dense (in=8, out=12) P('data','fsdp'): compress in -> (r, 12), out axis keeps 'fsdp';
    # the lost 'data' axis (size 2) moves onto the rank axis (r = 2), so the moment is
    # split 8 ways like its param instead of replicated along 'data'.
    assert tuple(found["dense"]) == ("data", "fsdp")
    # k_proj (d=8, heads=2, hd=4) P('fsdp','data',None): m = n = 8 -> compress in -> (r, 2, 4)
    assert tuple(found["attn/k_proj"])[:2] == (None, "data")
    # scanned (L=2, in=8, out=4) P(None,'data','fsdp'): m < n -> compress out -> (2, 8, r)
    assert tuple(found["layers/mlp"])[:2] == (None, "data")


# ---------------------------------------------------------------------------
# construction


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"scale_type": "row"}, "scale_type"),
        ({"update_proj_gap": 0}, "update_proj_gap"),
        ({"b1": 1.0}, "b1"),
        ({"b2": -0.1}, "b2"),
        ({"eps": -1.0}, "eps"),
        ({"scale": 0.0}, "scale"),
        ({"weight_decay": -1e-3}, "weight_decay"),
        ({"seed": -1}, "seed"),
        ({"norm_growth_gamma": 0.0}, "norm_growth_gamma"),
    ],
)
def test_invalid_hyperparameters(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        ot.apollo(1e-2, **kwargs)


def test_invalid_learning_rate_and_gamma():
    with pytest.raises(ValueError, match="learning_rate"):
        ot.apollo_mini(-1.0)
    with pytest.raises(ValueError, match="gamma"):
        ot.norm_growth_limiter(-1.0)


def test_registry_builds_both():
    assert {"apollo", "apollo_mini"} <= set(ot.names())
    assert ot.hyperparameters("apollo")["rank"] == 256
    assert ot.hyperparameters("apollo_mini")["scale"] == 128.0
    tx = ot.build("apollo_mini", learning_rate=1e-2)
    params = {"w": jnp.ones((4, 6))}
    u, _ = tx.update({"w": jnp.ones((4, 6))}, tx.init(params), params)
    assert u["w"].shape == (4, 6)


# ---------------------------------------------------------------------------
# helpers


def _np(x):
    return np.asarray(x, np.float64)


def _run(tx, grads_seq, params, *, jit=True):
    state = tx.init(params)
    step = jax.jit(tx.update) if jit else tx.update
    out = []
    for g in grads_seq:
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out, state


def _gaussian_proj(seed, rank):
    """A proj_fn drawing N(0, 1/rank) P per (path, block) with NumPy (independent of ours)."""

    def proj_fn(path, block, shape):
        rng = np.random.default_rng([seed, sum(map(ord, path)), len(path)])
        blocks = rng.standard_normal((8, *shape)).astype(np.float32) / np.sqrt(rank)
        return jnp.asarray(blocks)[block]

    return proj_fn


def _numpy_apollo(gs, ps, *, gap, channel, scale=1.0, front=False, gamma=1.01, eps=1e-6, bias=True):
    """ALGORITHMS.md §3.2 on one (m, n) slice in float64; ps[k] = P of block k."""
    m, n = gs[0].shape
    compress_in = m >= n
    mu = nu = None
    prev = None
    outs = []
    for t, g in enumerate(gs, start=1):
        p = ps[(t - 1) // gap]
        r = g @ p.T if compress_in else p.T @ g
        if mu is None:
            mu, nu = np.zeros_like(r), np.zeros_like(r)
        mu = B1 * mu + (1 - B1) * r
        nu = B2 * nu + (1 - B2) * r * r
        rt = mu / (np.sqrt(nu) + eps)
        if channel:
            ax = 1 if compress_in else 0
            s = np.linalg.norm(rt, axis=ax) / (np.linalg.norm(r, axis=ax) + 1e-8)
            u = g * (s[:, None] if compress_in else s[None, :])
        else:
            u = g * (np.linalg.norm(rt) / (np.linalg.norm(r) + 1e-8))
        if front:
            u = u * np.sqrt(scale)
        if gamma is not None:
            nrm = np.linalg.norm(u)
            if prev is None:
                prev = nrm
            else:
                lim = max(nrm / (prev + 1e-8), gamma) / gamma
                u = u / lim
                prev = nrm / lim
        if not front:
            u = u * np.sqrt(scale)
        b = math.sqrt(1 - B2**t) / (1 - B1**t) if bias else 1.0
        outs.append(b * u)
    return outs


# ---------------------------------------------------------------------------
# the update rule against oracles


@pytest.mark.parametrize(
    "shape_in_out, channel, front",
    [
        ((6, 10), True, False),  # m=10 >= n=6: compress in
        ((10, 6), True, False),  # m=6 < n=10: compress out
        ((8, 8), True, False),  # tie: compress in
        ((10, 6), False, True),  # tensor-wise, sqrt(scale) before the limiter
        ((6, 10), False, False),
    ],
)
def test_matches_numpy_oracle_across_refreshes(shape_in_out, channel, front):
    """12 steps, gap 4 (P refreshed at steps 0, 4, 8, moments carried over)."""
    n, m = shape_in_out
    rank, gap = 3, 4
    proj_fn = _gaussian_proj(0, rank)
    scale = 7.0
    tx = ot.random_proj_scale(
        rank=rank,
        scale_type="channel" if channel else "tensor",
        update_proj_gap=gap,
        scale=scale,
        scale_front=front,
        proj_fn=proj_fn,
    )
    rng = np.random.default_rng(1)
    # gradients whose norm varies strongly, so the limiter acts on some steps
    gks = [rng.standard_normal((n, m)).astype(np.float32) * (3.0 ** (i % 3)) for i in range(12)]
    outs, _ = _run(tx, [{"w": jnp.asarray(g)} for g in gks], {"w": jnp.zeros((n, m))})
    pshape = (1, rank, n) if m >= n else (1, m, rank)
    ps = [_np(proj_fn("w", jnp.int32(k), pshape))[0] for k in range(3)]
    ref = _numpy_apollo(
        [_np(g).T for g in gks], ps, gap=gap, channel=channel, scale=scale, front=front
    )
    for t, (u, r) in enumerate(zip(outs, ref, strict=True)):
        np.testing.assert_allclose(_np(u["w"]).T, r, rtol=2e-5, atol=1e-6, err_msg=f"step {t}")


def test_identity_projection_scales_match_adam_channel_norms():
    """Oracle 2: with P = I (full rank) and channel scaling, each output channel of the
    update is G_c * ||Adam_c|| / ||G_c||, with Adam (eps = 0) computed directly in float64.

    (optax.scale_by_adam is not used as the oracle: its fp32 bias correction
    1 - 0.999**t is off by ~1e-5 relative at t = 1.)"""
    n_in, m_out, steps = 5, 7, 6
    tx = ot.random_proj_scale(
        rank=n_in,
        eps=0.0,
        norm_growth_gamma=None,
        proj_fn=lambda path, block, shape: jnp.broadcast_to(jnp.eye(shape[1], shape[2]), shape),
    )
    rng = np.random.default_rng(2)
    gs = [rng.standard_normal((n_in, m_out)).astype(np.float32) for _ in range(steps)]
    outs, _ = _run(tx, [{"w": jnp.asarray(g)} for g in gs], {"w": jnp.zeros((n_in, m_out))})
    m = v = 0.0
    for t, (g, u) in enumerate(zip(gs, outs, strict=True), start=1):
        g, u = _np(g), _np(u["w"])
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        adam = (m / (1 - B1**t)) / np.sqrt(v / (1 - B2**t))
        # output channels are the columns of a Flax (in, out) kernel; norms over `in` (axis 0)
        want = g * np.linalg.norm(adam, axis=0) / np.linalg.norm(g, axis=0)
        np.testing.assert_allclose(u, want, rtol=2e-6)
        np.testing.assert_allclose(
            np.linalg.norm(u, axis=0), np.linalg.norm(adam, axis=0), rtol=2e-6
        )


@pytest.mark.parametrize("channel", [True, False])
def test_first_step_oracle_and_gradient_scale_invariance(channel):
    """Oracle 1 and 3: b_1 R~ = sign(R) (eps = 0), so the channel update is
    sqrt(r) G_c / ||R_c|| and the tensor update sqrt(#R) G / ||R||_F; G -> 1000 G
    leaves it unchanged."""
    n_in, m_out, rank = 6, 9, 4
    proj_fn = _gaussian_proj(3, rank)
    tx = ot.random_proj_scale(
        rank=rank, scale_type="channel" if channel else "tensor", eps=0.0, proj_fn=proj_fn
    )
    g = np.random.default_rng(4).standard_normal((n_in, m_out)).astype(np.float32)
    u1 = _np(tx.update({"w": jnp.asarray(g)}, tx.init({"w": g}), None)[0]["w"])
    u2 = _np(tx.update({"w": jnp.asarray(1000 * g)}, tx.init({"w": g}), None)[0]["w"])
    gv = _np(g).T  # (out, in) view
    pm = _np(proj_fn("w", jnp.int32(0), (1, rank, n_in)))[0]
    r = gv @ pm.T  # (m, r): compress in
    if channel:
        want = gv * (np.sqrt(rank) / np.linalg.norm(r, axis=1))[:, None]
    else:
        want = gv * np.sqrt(r.size) / np.linalg.norm(r)
    np.testing.assert_allclose(u1.T, want, rtol=1e-5)
    np.testing.assert_allclose(u2, u1, rtol=1e-5)


def test_rank_is_clamped_to_the_compressed_dimension():
    """rank > min(m, n) uses r = min(m, n) (documented rule): same state and updates."""
    params = {"a": jnp.zeros((8, 12)), "b": jnp.zeros((12, 8)), "c": jnp.zeros((2, 4, 16))}
    dims = {"a": ot.MatrixDims((0,), (1,)), "b": ot.MatrixDims((0,), (1,)),
            "c": ot.MatrixDims((0, 1), (2,))}  # fmt: skip
    big = ot.random_proj_scale(rank=64, dims=dims, seed=5)
    exact = ot.random_proj_scale(rank=8, dims=dims, seed=5)
    s = big.init(params)
    assert s.moments["a"].mu.shape == (8, 12)  # compress in (axis 0) -> r = 8
    assert s.moments["b"].mu.shape == (12, 8)  # m = 8 < n = 12: compress out (axis 1)
    assert s.moments["c"].mu.shape == (8, 1, 16)  # n = 2*4 = 8: axes (0, 1) -> (r, 1)
    rng = np.random.default_rng(6)
    gs = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
          for _ in range(3)]  # fmt: skip
    ub, _ = _run(big, gs, params)
    ue, _ = _run(exact, gs, params)
    for a, b in zip(jax.tree.leaves(ub), jax.tree.leaves(ue), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_projection_side_uses_semantic_out_in_sizes():
    """A (d=16, heads=2, head_dim=4) kernel has out = 8 < in = 16 (compress out), while
    its raw shape (16, 2, 4) would say otherwise; (in, out) == (16, 16) ties to `in`."""
    params = {
        "attn": {"k_proj": {"kernel": jnp.zeros((16, 2, 4))}},  # m=8, n=16
        "attn2": {"o_proj": {"kernel": jnp.zeros((2, 4, 16))}},  # m=16, n=8
        "sq": {"kernel": jnp.zeros((16, 16))},
        "layers": {"mlp": {"kernel": jnp.zeros((3, 16, 4))}},  # scanned, m=4 < n=16
    }
    s = ot.random_proj_scale(rank=2).init(params)
    assert s.moments["attn"]["k_proj"]["kernel"].mu.shape == (16, 2, 1)
    assert s.moments["attn2"]["o_proj"]["kernel"].mu.shape == (2, 1, 16)
    assert s.moments["sq"]["kernel"].mu.shape == (2, 16)
    assert s.moments["layers"]["mlp"]["kernel"].mu.shape == (3, 16, 2)
    assert s.prev_norm["layers"]["mlp"]["kernel"].shape == (3,)  # one limiter per layer


def test_batched_slices_equal_separate_matrices():
    """A scanned (L, in, out) kernel is L independent matrices (vmap), each with its own
    limiter; with injected P it equals running the slices one by one."""
    L, n, m, rank = 3, 10, 6, 2
    ps = np.random.default_rng(7).standard_normal((L, m, rank)).astype(np.float32)

    def proj_batched(path, block, shape):
        return jnp.asarray(ps).reshape(shape)

    tx = ot.random_proj_scale(rank=rank, proj_fn=proj_batched)
    rng = np.random.default_rng(8)
    gs = [rng.standard_normal((L, n, m)).astype(np.float32) * (1 + i) for i in range(4)]
    outs, _ = _run(tx, [{"layers": {"mlp": {"kernel": jnp.asarray(g)}}} for g in gs],
                   {"layers": {"mlp": {"kernel": jnp.zeros((L, n, m))}}})  # fmt: skip
    for i in range(L):
        ref = _numpy_apollo([_np(g[i]).T for g in gs], [_np(ps[i])], gap=200, channel=True)
        for t in range(4):
            got = _np(outs[t]["layers"]["mlp"]["kernel"][i]).T
            np.testing.assert_allclose(got, ref[t], rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# projections (observed through the state: b1 = 0 makes mu_t = R_t = G P^T)


def _observed_projections(tx, names, n, m, steps, state=None):
    """P^T rows read back from mu after each step with G = [I_n; 0] in the (out, in) view."""
    params = {k: {"kernel": jnp.zeros((n, m))} for k in names}
    g = np.zeros((n, m), np.float32)
    g[:, :n] = np.eye(n)  # Flax kernel (in, out) = G_view^T with G_view = [I_n; 0]
    grads = {k: {"kernel": jnp.asarray(g)} for k in names}
    state = tx.init(params) if state is None else state
    step = jax.jit(tx.update)
    seen = []
    for _ in range(steps):
        _, state = step(grads, state, params)
        # mu is stored as (r, out) = R^T; its first n columns are P
        seen.append({k: _np(state.moments[k]["kernel"].mu)[:, :n] for k in names})
    return seen, state


def test_projections_refresh_exactly_every_gap_and_are_reproducible():
    n, m, rank, gap = 64, 96, 8, 3
    mk = lambda seed: ot.random_proj_scale(rank=rank, update_proj_gap=gap, b1=0.0, seed=seed)
    seen, _ = _observed_projections(mk(0), ["a", "b"], n, m, 10)
    for t in range(1, 10):
        same = np.array_equal(seen[t]["a"], seen[t - 1]["a"])
        assert same == (t % gap != 0), f"step {t}: P changed={not same}"
    # different params -> different projections
    assert not np.allclose(seen[0]["a"], seen[0]["b"])
    # entries ~ N(0, 1/r) (here 8 * 64 * 4 blocks = 2048 samples per param)
    blocks = np.concatenate([seen[t]["a"].ravel() for t in (0, 3, 6, 9)])
    assert abs(blocks.var() * rank - 1.0) < 0.1, blocks.var() * rank
    assert abs(blocks.mean()) < 4 * math.sqrt(1.0 / rank / blocks.size)
    # same seed: a fresh transform reproduces the projections, and so does another fresh
    # transform resuming from its state (a restart from a checkpoint)
    first, state = _observed_projections(mk(0), ["a", "b"], n, m, 4)
    resumed, _ = _observed_projections(mk(0), ["a", "b"], n, m, 6, state=state)
    for t, obs in enumerate(first + resumed):
        np.testing.assert_array_equal(obs["a"], seen[t]["a"])
        np.testing.assert_array_equal(obs["b"], seen[t]["b"])
    # different seed -> different projections
    other, _ = _observed_projections(mk(1), ["a"], n, m, 1)
    assert not np.allclose(other[0]["a"], seen[0]["a"])


@pytest.mark.parametrize("max_batched", [1 << 16, 20])  # 20: the (1, 4, 6) draws go alone
def test_batched_draws_equal_the_documented_per_slice_keys(max_batched, monkeypatch):
    # P of slice i of leaf `path`: N(0, 1/r) drawn with
    # fold_in(fold_in(fold_in(key(seed), crc32(path)), block), i), whatever else is drawn
    # in the same step (small requests of one shape are drawn together).
    apollo_mod = sys.modules["optim_transforms.apollo"]
    monkeypatch.setattr(apollo_mod, "_BATCHED_DRAW_MAX_SIZE", max_batched)
    key_data = jax.random.key_data(jax.random.key(7))
    requests = [("a/kernel", (1, 4, 6), 4), ("b/kernel", (3, 5, 2), 2), ("c/kernel", (1, 4, 6), 4)]
    block = jnp.int32(5)
    got = jax.jit(lambda k, b: apollo_mod._sample_projections(k, b, requests))(key_data, block)

    # jitted like the update: op-by-op erfinv can round differently by 1 ulp
    @functools.partial(jax.jit, static_argnums=(2, 3))
    def one_draw(crc, i, shape, rank):
        leaf_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), crc), 5)
        return jax.random.normal(jax.random.fold_in(leaf_key, i), shape) / jnp.sqrt(
            jnp.float32(rank)
        )

    for (path, shape, rank), p in zip(requests, got):
        crc = zlib.crc32(path.encode()) & 0x7FFFFFFF
        for i in range(shape[0]):
            want = one_draw(jnp.uint32(crc), i, shape[1:], rank)
            np.testing.assert_array_equal(np.asarray(p[i]), np.asarray(want), err_msg=path)


def test_projection_draws_do_not_loop_per_leaf():
    # On CPU every Threefry call lowers to a `while` loop with a per-iteration cost; drawing
    # each leaf's P separately put 4 loops per leaf in the step (336 for llama-130m, ~15% of
    # APOLLO-Mini's update time). Batched, the loop count depends on the distinct P shapes.
    def whiles(n_leaves):
        params = {f"w{i}": jnp.zeros((16, 8)) for i in range(n_leaves)}
        params["v"] = jnp.zeros((8, 24))
        tx = ot.apollo_mini(1e-2)
        state = jax.eval_shape(tx.init, params)
        text = jax.jit(tx.update).lower(params, state, params).compile().as_text()
        return text.count(" while(")

    few, many = whiles(2), whiles(12)
    assert many == few, (few, many)
    assert many <= 2 + 2 * 2 + 2, many  # leaf keys, then per shape: slice keys and normals


def test_state_stores_key_data_not_the_projection():
    n, m, rank = 64, 96, 8
    s = ot.random_proj_scale(rank=rank).init({"w": jnp.zeros((n, m))})
    sizes = sorted(x.size for x in jax.tree.leaves(s))
    # count, previous norm, key data (2 x uint32), mu and nu (r x out); no r x in projection
    assert sizes == [1, 1, 2, rank * m, rank * m]
    assert s.key.dtype == jnp.uint32


def test_moments_are_not_reset_on_refresh():
    """Across a refresh mu_t = b1 mu_{t-1} + (1 - b1) R_t with the new P (apollo-torch)."""
    n, m, rank = 6, 8, 3
    proj_fn = _gaussian_proj(9, rank)
    tx = ot.random_proj_scale(rank=rank, update_proj_gap=2, proj_fn=proj_fn)
    rng = np.random.default_rng(10)
    params = {"w": jnp.zeros((n, m))}
    state = tx.init(params)
    mus = []
    gs = [rng.standard_normal((n, m)).astype(np.float32) for _ in range(3)]
    for g in gs:
        _, state = tx.update({"w": jnp.asarray(g)}, state, params)
        mus.append(_np(state.moments["w"].mu))
    p1 = _np(proj_fn("w", jnp.int32(1), (1, rank, n)))[0]
    r3 = _np(gs[2]).T @ p1.T  # step 3 (count 2) is the first of block 1
    np.testing.assert_allclose(mus[2], B1 * mus[1] + (1 - B1) * r3.T, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# norm-growth limiter


def test_norm_growth_limiter_bounds_growth():
    gamma = 1.01
    tx = ot.norm_growth_limiter(gamma)
    rng = np.random.default_rng(11)
    params = {"w": jnp.zeros((5, 7)), "v": jnp.zeros((4,)), "layers": {"k": jnp.zeros((2, 3, 4))}}
    scales = [1.0, 5.0, 0.1, 3.0, 3.0, 0.5, 100.0]
    gs = [
        jax.tree.map(lambda x, s=s: jnp.asarray(s * rng.standard_normal(x.shape), jnp.float32),
                     params)
        for s in scales
    ]  # fmt: skip
    outs, _ = _run(tx, gs, params)
    # first step unchanged
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(gs[0]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    slices = lambda tree: (
        [_np(tree["w"]), _np(tree["v"])]
        + [
            _np(tree["layers"]["k"][i])
            for i in range(2)  # one norm per slice of a stacked leaf
        ]
    )
    for t in range(1, len(scales)):
        limited = False
        for prev, cur, raw in zip(slices(outs[t - 1]), slices(outs[t]), slices(gs[t]),
                                  strict=True):  # fmt: skip
            bound = gamma * np.linalg.norm(prev)
            assert np.linalg.norm(cur) <= bound * (1 + 1e-6)
            if np.linalg.norm(raw) <= bound:  # not limited: unchanged
                np.testing.assert_allclose(cur, raw, rtol=1e-6)
            else:
                limited = True
                np.testing.assert_allclose(np.linalg.norm(cur), bound, rtol=1e-5)
        assert limited == (t != 2), t  # only step 2 (norm shrinks 50x) passes unlimited
    # growth by 5x at step 1 was limited to 1.01x
    np.testing.assert_allclose(
        np.linalg.norm(_np(outs[1]["w"])), gamma * np.linalg.norm(_np(gs[0]["w"])), rtol=1e-5
    )


def test_limiter_composes_with_random_proj_scale():
    """random_proj_scale's built-in limiter == the standalone one chained after it."""
    proj_fn = _gaussian_proj(12, 2)
    common = dict(rank=2, update_proj_gap=3, bias_correction=False, proj_fn=proj_fn)
    inner = ot.random_proj_scale(norm_growth_gamma=1.01, **common)
    chained = optax.chain(
        ot.random_proj_scale(norm_growth_gamma=None, **common), ot.norm_growth_limiter(1.01)
    )
    rng = np.random.default_rng(13)
    params = {"w": jnp.zeros((6, 9)), "layers": {"mlp": {"kernel": jnp.zeros((2, 9, 6))}}}
    gs = [jax.tree.map(lambda x, i=i: jnp.asarray((1 + 2 * (i % 2)) * rng.standard_normal(x.shape),
                                                  jnp.float32), params)
          for i in range(6)]  # fmt: skip
    a, _ = _run(inner, gs, params)
    b, _ = _run(chained, gs, params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


@pytest.mark.parametrize("magnitude", [1.0, 1e25, "mixed"])
def test_tensor_limiter_norm_is_exact_at_any_gradient_magnitude(magnitude):
    """The tensor-wise built-in limiter takes ||G s|| as |s| ||G|| from a plain sum of
    squares, which overflows in fp32 at |g| ~ 1e25 where G s does not; there it must fall
    back to the direct form (underflow: the next test). Oracle: the standalone limiter
    chained after the unlimited transform, which forms U = G s (and is not changed by it).
    "mixed": one stacked leaf whose slices are 1e25 and 1 (one predicate for the leaf)."""
    proj_fn = _gaussian_proj(21, 1)
    common = dict(
        rank=1, scale_type="tensor", update_proj_gap=3, bias_correction=False, proj_fn=proj_fn
    )
    inner = ot.random_proj_scale(norm_growth_gamma=1.01, **common)
    chained = optax.chain(
        ot.random_proj_scale(norm_growth_gamma=None, **common), ot.norm_growth_limiter(1.01)
    )
    rng = np.random.default_rng(17)
    params = {"w": jnp.zeros((6, 9)), "layers": {"mlp": {"kernel": jnp.zeros((2, 9, 6))}}}
    slice_scale = np.array([1e25, 1.0]) if magnitude == "mixed" else None

    def grad(x, i):
        g = (1 + 4 * (i % 2)) * rng.standard_normal(x.shape)  # growth every other step
        if slice_scale is None:
            scale = magnitude
        else:
            scale = slice_scale[:, None, None] if g.ndim == 3 else 1.0
        return jnp.asarray(g * scale, jnp.float32)

    gs = [jax.tree.map(lambda x, i=i: grad(x, i), params) for i in range(6)]
    (a, sa), (b, _) = _run(inner, gs, params), _run(chained, gs, params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.all(np.isfinite(_np(x)))
        np.testing.assert_allclose(_np(x), _np(y), rtol=2e-6)
    assert all(np.all(np.isfinite(_np(x))) for x in jax.tree.leaves(sa.prev_norm))


@pytest.mark.parametrize(
    ("g_scale", "coef"), [(1.0, 0.3), (1e25, 1e-24), (1e-21, 1e12), (0.0, 2.0), (3e-30, 0.0)]
)
def test_scaled_norm_matches_float64(g_scale, coef):
    """`_scaled_norm` (tensor): ||g c|| per slice of a stacked leaf, where g**2 may overflow
    (1e25) or lose precision to underflow (1e-21: squares ~1e-42 are subnormal) while g c is
    an ordinary number; float64 oracle."""
    from optim_transforms.apollo import _scaled_norm

    g = np.random.default_rng(5).standard_normal((3, 16, 24)) * g_scale
    c = np.full((3, 1, 1), coef)
    g32, c32 = jnp.asarray(g, jnp.float32), jnp.asarray(c, jnp.float32)
    got = _scaled_norm(g32, c32, (1, 2), tensor=True)
    want = np.sqrt(np.sum((g.astype(np.float32).astype(np.float64) * coef) ** 2, axis=(1, 2)))
    np.testing.assert_allclose(_np(got).reshape(3), want, rtol=1e-5)


def test_apollo_update_norm_growth_is_limited():
    """||U_t|| <= 1.01 ||U_{t-1}|| for U = update / (lr * b_t * sqrt(scale)) on a matrix."""
    lr, scale = 0.1, 4.0
    tx = ot.apollo(lr, rank=2, scale=scale)
    params = {"mlp": {"kernel": jnp.zeros((8, 12))}}
    rng = np.random.default_rng(14)
    gs = [{"mlp": {"kernel": jnp.asarray((1 + 9 * (i % 2)) * rng.standard_normal((8, 12)),
                                         jnp.float32)}} for i in range(6)]  # fmt: skip
    outs, _ = _run(tx, gs, params)
    norms = []
    for t, u in enumerate(outs, start=1):
        bt = math.sqrt(1 - B2**t) / (1 - B1**t)
        norms.append(np.linalg.norm(_np(u["mlp"]["kernel"])) / (lr * bt * math.sqrt(scale)))
    for t in range(1, len(norms)):
        assert norms[t] <= 1.01 * norms[t - 1] * (1 + 1e-5), norms


# ---------------------------------------------------------------------------
# named optimizers: routing, weight decay, zero gradients


def test_apollo_routes_non_matrices_to_official_adamw_and_decays_after_the_step():
    lr, wd = 0.05, 0.3
    params = {
        "embed": {"embedding": jnp.full((10, 4), 0.5)},
        "norm": {"scale": jnp.full((4,), 2.0)},
        "mlp": {"kernel": jnp.full((4, 6), -1.0)},
    }
    tx = ot.apollo(lr, rank=2, weight_decay=wd)
    g = jax.tree.map(lambda x: jnp.full_like(x, 0.25), params)
    u, state = tx.update(g, tx.init(params), params)
    # step 1 of HF AdamW: m/(sqrt(v)+eps) * sqrt(1-b2)/(1-b1) with m=(1-b1)g, v=(1-b2)g^2
    d = (1 - B1) * 0.25 / (math.sqrt(1 - B2) * 0.25 + 1e-6) * math.sqrt(1 - B2) / (1 - B1)
    for key, leaf, p0 in (("embed", "embedding", 0.5), ("norm", "scale", 2.0)):
        stepped = p0 - lr * d
        want = (stepped - lr * wd * stepped) - p0  # theta <- theta - lr*wd*theta after the step
        np.testing.assert_allclose(_np(u[key][leaf]), want, rtol=1e-6)
    # the matrix went through random_proj_scale (one state entry), the others did not
    inner = state[0].inner_states
    mats = inner["matrix"].inner_state.moments
    assert mats["mlp"]["kernel"] is not None
    assert mats["embed"]["embedding"] is None and mats["norm"]["scale"] is None


def test_learning_rate_schedule_drives_step_and_decay():
    """With zero gradients the update is the decay alone: -lr(t) * wd * theta_t."""
    sched = optax.linear_schedule(1e-1, 1e-2, 4)
    wd = 0.5
    params = {"mlp": {"kernel": jnp.ones((4, 6))}, "b": jnp.ones((6,))}
    tx = ot.apollo(sched, rank=2, weight_decay=wd)
    state = tx.init(params)
    step = jax.jit(tx.update)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for t in range(4):
        u, state = step(zeros, state, params)
        for x, p in zip(jax.tree.leaves(u), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(_np(x), -float(sched(t)) * wd * _np(p), rtol=1e-6)
        params = optax.apply_updates(params, u)


def test_zero_gradient_is_finite_and_zero():
    tx = ot.apollo_mini(1e-2)
    params = {"mlp": {"kernel": jnp.ones((8, 12))}}
    outs, state = _run(tx, [jax.tree.map(jnp.zeros_like, params)] * 2, params)
    assert np.all(_np(outs[-1]["mlp"]["kernel"]) == 0.0)
    assert all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in jax.tree.leaves(state))


def test_nonfinite_gradient_is_skipped():
    tx = ot.apollo(1e-2, rank=2, skip_nonfinite=True)
    params = {"mlp": {"kernel": jnp.ones((4, 6))}}
    s0 = tx.init(params)
    bad = {"mlp": {"kernel": jnp.full((4, 6), jnp.nan)}}
    u, s1 = tx.update(bad, s0, params)
    assert np.all(np.asarray(u["mlp"]["kernel"]) == 0)
    for a, b in zip(jax.tree.leaves(s0.inner_state), jax.tree.leaves(s1.inner_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------
# state bytes on a LLaMA-130M-shaped tree (no allocation)

HIDDEN, INTER, LAYERS, VOCAB = 768, 2048, 12, 32000


def llama130m_shapes():
    """(in, out) Flax kernels; attention and MLP as 2-D Dense kernels."""
    f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    layer = {
        "attn": {k: {"kernel": f(HIDDEN, HIDDEN)} for k in attn},
        "mlp": {"gate_proj": {"kernel": f(HIDDEN, INTER)}, "up_proj": {"kernel": f(HIDDEN, INTER)},
                "down_proj": {"kernel": f(INTER, HIDDEN)}},
        "input_norm": {"scale": f(HIDDEN)},
        "post_attn_norm": {"scale": f(HIDDEN)},
    }  # fmt: skip
    return {
        "embed": {"embedding": f(VOCAB, HIDDEN)},
        "layers": {str(i): layer for i in range(LAYERS)},
        "final_norm": {"scale": f(HIDDEN)},
        "lm_head": {"kernel": f(HIDDEN, VOCAB)},
    }


def _state_bytes(tx, params):
    st = jax.eval_shape(tx.init, params)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(st)), st


def _leaf_bytes(tree):
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, rank", [("apollo", 256), ("apollo_mini", 1)])
def test_state_bytes_llama130m(name, rank):
    params = llama130m_shapes()
    labels = ot.matrix_labels(params)
    mats = [
        p for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if lab == "matrix"
    ]
    others = [
        p for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if lab != "matrix"
    ]
    assert len(mats) == 7 * LAYERS  # embedding and LM head stay on AdamW
    tx = ot.apollo(1e-2, rank=256) if name == "apollo" else ot.apollo_mini(1e-2)
    total, st = _state_bytes(tx, params)
    inner = st[0].inner_states
    rps = inner["matrix"].inner_state
    adam = inner["adamw"].inner_state
    # ALGORITHMS.md §3.2 per m x n matrix: M, V = 2 r max(m, n); nu (limiter) = 1; P is
    # regenerated from the key (not stored), so the paper's r min(m, n) term is absent.
    moments_formula = sum(4 * 2 * rank * max(p.shape) for p in mats)
    assert _leaf_bytes(rps.moments) == moments_formula
    assert _leaf_bytes(rps.prev_norm) == 4 * len(mats)
    assert _leaf_bytes(rps.key) == 8 and _leaf_bytes(rps.count) == 4
    # AdamW fallback: 2 fp32 moments per non-matrix element, plus its step count
    assert _leaf_bytes(adam.mu) + _leaf_bytes(adam.nu) == 4 * 2 * sum(
        math.prod(p.shape) for p in others
    )
    # everything else is counters/flags (apply_if_finite, decay step, ...)
    rest = total - _leaf_bytes(rps) - _leaf_bytes(adam)
    assert 0 < rest <= 32, rest
    adamw_total, _ = _state_bytes(optax.adamw(1e-2), params)
    adamw_on_mats = 4 * 2 * sum(math.prod(p.shape) for p in mats)
    apollo_on_mats = moments_formula + 4 * len(mats)
    if name == "apollo_mini":
        assert apollo_on_mats / adamw_on_mats < 0.01
        # exact: per matrix 2 max(m, n) + 1 floats
        assert apollo_on_mats == 4 * sum(2 * max(p.shape) + 1 for p in mats)
    else:
        assert apollo_on_mats == 4 * sum(2 * 256 * max(p.shape) + 1 for p in mats)
    assert total < adamw_total


# ---------------------------------------------------------------------------
# parity with apollo-torch 1.0.3


def _import_apollo_torch():
    """APOLLOAdamW, importing the package with a stand-in for bitsandbytes (never used by it)."""
    torch = pytest.importorskip("torch")
    added = {}
    if "bitsandbytes" not in sys.modules:
        bnb = types.ModuleType("bitsandbytes")
        optim = types.ModuleType("bitsandbytes.optim")
        opt = types.ModuleType("bitsandbytes.optim.optimizer")
        opt.Optimizer2State = type("Optimizer2State", (torch.optim.Optimizer,), {})
        func = types.ModuleType("bitsandbytes.functional")
        bnb.optim, optim.optimizer, bnb.functional = optim, opt, func
        added = {
            "bitsandbytes": bnb,
            "bitsandbytes.optim": optim,
            "bitsandbytes.optim.optimizer": opt,
            "bitsandbytes.functional": func,
        }
        sys.modules.update(added)
    try:
        from apollo_torch import APOLLOAdamW
    finally:
        for k in added:
            sys.modules.pop(k, None)
    return torch, APOLLOAdamW


PARITY_SHAPES = {"w_tall": (24, 16), "w_wide": (16, 24), "w_square": (16, 16)}  # (out, in)


@pytest.mark.parametrize(
    "scale_type, rank, scale, front",
    [("channel", 4, 1.0, False), ("tensor", 1, 128.0, False), ("tensor", 1, 128.0, True)],
)
def test_parity_with_apollo_torch(scale_type, rank, scale, front):
    torch, APOLLOAdamW = _import_apollo_torch()
    steps, gap, lr, wd = 24, 7, 1e-2, 0.1
    rng = np.random.default_rng(16)
    w0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in PARITY_SHAPES.items()}
    w0["bias"] = rng.standard_normal((16,)).astype(np.float32)
    grads = [
        {k: (rng.standard_normal(v.shape) * (1 + 4 * (t % 3 == 0))).astype(np.float32)
         for k, v in w0.items()}
        for t in range(steps)
    ]  # fmt: skip

    # torch in float64 (its updates, read off the params, are then exact to ~1e-16), ours in
    # float32; matrices in the APOLLO group (proj "random", proj_type "std"), bias in plain AdamW
    tp = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in w0.items()}
    opt = APOLLOAdamW(
        [
            {"params": [tp[k] for k in PARITY_SHAPES], "rank": rank, "proj": "random",
             "scale_type": scale_type, "update_proj_gap": gap, "scale": scale,
             "proj_type": "std"},
            {"params": [tp["bias"]]},
        ],
        lr=lr, weight_decay=wd, scale_front=front,
    )  # fmt: skip
    t_updates, projs = [], {k: [] for k in PARITY_SHAPES}
    for t in range(steps):
        before = {k: p.detach().clone() for k, p in tp.items()}
        for k, p in tp.items():
            p.grad = torch.tensor(grads[t][k], dtype=torch.float64)
        opt.step()
        t_updates.append({k: (tp[k].detach() - before[k]).numpy() for k in tp})
        if t % gap == 0:  # the projection drawn at this step serves block t // gap
            for k in PARITY_SHAPES:
                projs[k].append(opt.state[tp[k]]["projector"].ortho_matrix.numpy().copy())

    # ours: Flax kernels (in, out) = W^T, the same projections injected by path
    stacked = {k: jnp.asarray(np.stack(v), jnp.float32) for k, v in projs.items()}
    proj_fn = lambda path, block, shape: stacked[path.split("/")[0]][block].reshape(shape)
    kw = dict(update_proj_gap=gap, scale=scale, weight_decay=wd, scale_front=front,
              proj_fn=proj_fn)  # fmt: skip
    tx = ot.apollo(lr, rank=rank, **kw) if scale_type == "channel" else ot.apollo_mini(lr, **kw)
    to_flax = lambda d: {k: ({"kernel": jnp.asarray(v.T)} if k != "bias" else jnp.asarray(v))
                         for k, v in d.items()}  # fmt: skip
    params = to_flax(w0)
    state = tx.init(params)
    step = jax.jit(tx.update)
    worst = 0.0
    for t in range(steps):
        u, state = step(to_flax(grads[t]), state, params)
        params = optax.apply_updates(params, u)
        for k, want in t_updates[t].items():
            got = _np(u[k]["kernel"]).T if k != "bias" else _np(u[k])
            worst = max(worst, float(np.max(np.abs(got - want))))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"{k} step {t}")
    assert len(projs["w_tall"]) == math.ceil(steps / gap) >= 3  # refreshes were exercised
    assert worst < 1e-5
