"""CAME: harness, parity with came-pytorch 0.1.3, ALGORITHMS.md §5.5 oracles, state size.

Layouts: our params are Flax-style; ``came-pytorch`` factors the last two
axes of whatever tensor it is given. Parity is checked both on arrays in the
same layout and with the PyTorch ``(out, in)`` weight given the transposed
Flax ``(in, out)`` kernel (CAME is transpose-equivariant).
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_transforms as ot
from optim_transforms.came import ScaleByCameState
from tests import harness

torch = pytest.importorskip("torch")
came_pytorch = pytest.importorskip("came_pytorch")

LR = 1e-2
SHAPES = {
    "scalar": (),
    "vec": (7,),
    "square": (6, 6),
    "wide": (5, 9),
    "tall": (9, 4),
    "cube": (3, 4, 5),
}


def _randn(rng, shapes):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _np_tree(tree):
    return jax.tree.map(np.asarray, tree)


# --------------------------------------------------------------------------- harness


@pytest.mark.parametrize("check", harness.CHECKS)
def test_harness(check):
    hparams = {"learning_rate": LR, "weight_decay": 0.1}
    harness.run_check(check, ot.came, hparams)


def test_inject_hyperparams_default_betas():
    """Injected default betas act as their float32 roundings, exactly."""
    f32 = lambda x: float(np.float32(x))
    injected = optax.inject_hyperparams(ot.came)(learning_rate=LR, weight_decay=0.1)
    rounded = ot.came(LR, weight_decay=0.1, b1=f32(0.9), b2=f32(0.999), b3=f32(0.9999))
    params = {"w": jnp.ones((6, 5)), "k": jnp.ones((2, 3, 4)), "b": jnp.ones((5,))}
    si, sr = injected.init(params), rounded.init(params)
    step_i, step_r = jax.jit(injected.update), jax.jit(rounded.update)
    for t in range(3):
        g = {
            k: jnp.sin(jnp.arange(x.size, dtype=jnp.float32) * (t + 1.3)).reshape(x.shape)
            for k, x in params.items()
        }
        ui, si = step_i(g, si, params)
        ur, sr = step_r(g, sr, params)
        for a, b in zip(jax.tree.leaves(ui), jax.tree.leaves(ur), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_harness_matrix_dims_sharding():
    """The matrix-view layout (keepdims statistics) keeps its state sharding."""
    harness.run_check("sharding", ot.came, {"learning_rate": LR, "dims": ot.default_matrix_dims})


@pytest.mark.slow
@pytest.mark.parametrize("check", harness.CHECKS)
@pytest.mark.parametrize(
    "hparams",
    [{"cautious": True}, {"confidence": False}, {"dims": ot.default_matrix_dims}],
    ids=["cautious", "no_confidence", "matrix_dims"],
)
def test_harness_variants(check, hparams):
    if check == "inject_hyperparams":
        if "dims" in hparams:
            # inject_hyperparams takes any callable argument for a schedule; a callable
            # `dims` needs static_args=("dims",) there. A MatrixDims value is static.
            hparams["dims"] = ot.MatrixDims((0,), (1,))
    harness.run_check(check, ot.came, {"learning_rate": LR, **hparams})


# --------------------------------------------------------------------------- parity


def _run_pair(shapes, *, weight_decay, steps, transpose_torch=False, seed=0):
    """Runs ours and came-pytorch side by side; returns both final params and states.

    With ``transpose_torch`` the 2-D leaves are Flax ``(in, out)`` kernels and
    torch gets the ``(out, in)`` weight ``K.T`` and gradient ``G.T``.
    """
    rng = np.random.default_rng(seed)
    params = _randn(rng, shapes)
    to_t = (lambda x: x.T.copy() if x.ndim == 2 else x) if transpose_torch else (lambda x: x)
    tparams = {k: torch.nn.Parameter(torch.tensor(to_t(v))) for k, v in params.items()}
    topt = came_pytorch.CAME(list(tparams.values()), lr=LR, weight_decay=weight_decay)
    tx = ot.came(LR, weight_decay=weight_decay)
    jparams = jax.tree.map(jnp.asarray, params)
    state = tx.init(jparams)

    @jax.jit
    def step(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        grads = _randn(rng, shapes)
        for k, p in tparams.items():
            p.grad = torch.tensor(to_t(grads[k]))
        topt.step()
        jparams, state = step(jax.tree.map(jnp.asarray, grads), state, jparams)
    ours = _np_tree(jparams)
    ref = {k: to_t(p.detach().numpy()) for k, p in tparams.items()}
    tstate = {k: topt.state[p] for k, p in tparams.items()}
    return params, ours, ref, state, tstate


@pytest.mark.parametrize(
    ("private", "chunk"),
    [(None, False), (True, False), (False, False), (True, True)],
    ids=["auto", "private", "shared", "private-chunked-cols"],
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_parity_came_pytorch_same_layout(weight_decay, private, chunk, monkeypatch):
    """Every way of taking the factored means: private reduction inputs (CPU) or
    shared ones (elsewhere), and column means over column blocks in a loop."""
    mod = sys.modules["optim_transforms.came"]
    monkeypatch.setattr(mod, "_PRIVATE_INPUTS", private)
    if chunk:  # "wide" (5, 9): 4 blocks of 2 and a tail of 1; "cube" (3, 4, 5): 2 and 1
        monkeypatch.setattr(mod, "_COL_CHUNK_LIMIT", 3)
        monkeypatch.setattr(mod, "_COL_CHUNK", 2)
    params0, ours, ref, state, tstate = _run_pair(SHAPES, weight_decay=weight_decay, steps=30)
    inner = state[0]  # chain -> scale_by_came
    assert isinstance(inner, ScaleByCameState)
    for k in SHAPES:
        moved = np.max(np.abs(ref[k] - params0[k]))
        assert moved > 1e-2, f"{k}: the reference barely moved ({moved}); test is vacuous"
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
        ts = tstate[k]
        pairs = [(inner.mu[k], ts["exp_avg"])]
        if len(SHAPES[k]) >= 2:
            pairs += [
                (inner.nu_row[k], ts["exp_avg_sq_row"]),
                (inner.nu_col[k], ts["exp_avg_sq_col"]),
                (inner.res_row[k], ts["exp_avg_res_row"]),
                (inner.res_col[k], ts["exp_avg_res_col"]),
            ]
            assert inner.nu[k] is None
        else:
            pairs.append((inner.nu[k], ts["exp_avg_sq"]))
            assert inner.nu_row[k] is None and inner.res_row[k] is None
        for a, b in pairs:
            b = b.numpy()
            assert a.shape == b.shape and a.dtype == jnp.float32
            np.testing.assert_allclose(
                np.asarray(a), b, rtol=1e-5, atol=1e-5 * np.max(np.abs(b)), err_msg=k
            )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_parity_came_pytorch_flax_kernels(weight_decay):
    """Flax ``(in, out)`` kernels vs the reference on the PyTorch ``(out, in)`` weights."""
    shapes = {"square": (6, 6), "wide": (5, 9), "tall": (9, 4), "vec": (7,)}
    params0, ours, ref, _, _ = _run_pair(
        shapes, weight_decay=weight_decay, steps=30, transpose_torch=True
    )
    for k in shapes:
        assert np.max(np.abs(ref[k] - params0[k])) > 1e-2
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)


# --------------------------------------------------------------------------- oracles


def _first_step(tx, grads):
    state = tx.init(grads)
    return jax.jit(tx.update)(grads, state, grads)[0]


def test_rank_one_step_one_oracle():
    """G = a bᵀ: step 1 is 0.1 / sqrt(1e-4 * 0.81) * sign(G) = 11.11 sign(G) (§5.5.1)."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(6), rng.standard_normal(10)
    g2 = np.outer(a, b).astype(np.float32)
    g3 = np.stack([g2, 3.0 * g2[::-1]]).astype(np.float32)
    out = _first_step(ot.scale_by_came(), {"m": jnp.asarray(g2), "b": jnp.asarray(g3)})
    expected = 0.1 / math.sqrt(1e-4 * 0.81)
    assert abs(expected - 11.111) < 1e-3
    np.testing.assert_allclose(np.asarray(out["m"]), expected * np.sign(g2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["b"]), expected * np.sign(g3), rtol=1e-5)


def test_vector_step_one_oracle():
    """1-D and 0-D params: no confidence term, step 1 is 0.1 sign(g) (§5.5.1)."""
    g = {"v": jnp.asarray([0.3, -2.0, 5e-3, -7.0]), "s": jnp.asarray(-4.0)}
    out = _first_step(ot.scale_by_came(), g)
    np.testing.assert_allclose(np.asarray(out["v"]), 0.1 * np.sign(g["v"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["s"]), -0.1, rtol=1e-5)


def _numpy_came(grads, steps, *, confidence, b1=0.9, b2=0.999, b3=0.9999, eps=(1e-30, 1e-16)):
    """ALGORITHMS.md §5.2 for 2-D ``G`` in float64, forming V̂ and Ŝ explicitly."""
    m = np.zeros_like(grads[0], np.float64)
    r = np.zeros(m.shape[0])
    c = np.zeros(m.shape[1])
    rr, cc = np.zeros_like(r), np.zeros_like(c)
    out = []
    for g in grads[:steps]:
        g = g.astype(np.float64)
        q = g * g + eps[0]
        r = b2 * r + (1 - b2) * q.mean(axis=1)
        c = b2 * c + (1 - b2) * q.mean(axis=0)
        v_hat = np.outer(r, c) / r.mean()
        u = g / np.sqrt(v_hat)
        u = u / max(1.0, np.sqrt(np.mean(u * u)))
        m = b1 * m + (1 - b1) * u
        if confidence:
            big_u = (u - m) ** 2 + eps[1]
            rr = b3 * rr + (1 - b3) * big_u.mean(axis=1)
            cc = b3 * cc + (1 - b3) * big_u.mean(axis=0)
            s_hat = np.outer(rr, cc) / rr.mean()
            out.append(m / np.sqrt(s_hat))
        else:
            out.append(m.copy())
    return out


@pytest.mark.parametrize("confidence", [True, False])
def test_numpy_oracle_explicit_vhat(confidence):
    """Our rsqrt-of-factors path equals §5.2 with V̂, Ŝ formed explicitly (float64).

    ``confidence=False`` is factored Adafactor with momentum and clipping, Δ = m (§5.5.2).
    """
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal((7, 11)).astype(np.float32) * (1 + t) for t in range(10)]
    want = _numpy_came(grads, 10, confidence=confidence)
    tx = ot.scale_by_came(confidence=confidence)
    state = tx.init(jnp.zeros((7, 11)))
    step = jax.jit(tx.update)
    for t, g in enumerate(grads):
        u, state = step(jnp.asarray(g), state)
        # Steps reach |x| ~ 30 here, where one float32 ulp is 1.9e-6; elements that
        # are small through cancellation (m = b1 m + (1 - b1) u) carry absolute errors
        # of a few ulps of the large ones, so atol scales with the step's max.
        atol = 1e-6 * np.max(np.abs(want[t]))
        np.testing.assert_allclose(np.asarray(u), want[t], rtol=2e-5, atol=atol, err_msg=str(t))
    if not confidence:
        np.testing.assert_array_equal(np.asarray(u), np.asarray(state.mu))
        assert state.res_row is None and state.res_col is None


def test_clipped_update_rms_at_most_threshold():
    """With b1 = 0 and no confidence the step is the clipped u: RMS(u) <= d (§5.5.3)."""
    rng = np.random.default_rng(3)
    for d in (1.0, 0.25):
        tx = ot.scale_by_came(b1=0.0, confidence=False, clip_threshold=d)
        g0 = {"w": jnp.zeros((8, 5)), "v": jnp.zeros((5,))}
        state = tx.init(g0)
        step = jax.jit(tx.update)
        clipped = 0
        for _ in range(20):
            scale = 10.0 ** rng.uniform(-3, 3)
            g = {k: jnp.asarray(rng.standard_normal(x.shape) * scale) for k, x in g0.items()}
            u, state = step(g, state)
            for x in jax.tree.leaves(u):
                rms = float(jnp.sqrt(jnp.mean(jnp.square(x))))
                assert rms <= d * (1 + 1e-5)
                clipped += rms > d * (1 - 1e-5)
        assert clipped > 0, "no step reached the threshold; the test does not exercise the clip"


@pytest.mark.parametrize("shape", [(6, 10), (3, 5, 8)])
def test_transposed_input_gives_transposed_update(shape):
    """CAME(Gᵀ) = CAME(G)ᵀ over 50 steps (last two axes swapped) (§5.5.3)."""
    rng = np.random.default_rng(4)
    swap = lambda x: jnp.swapaxes(x, -1, -2)
    tx = ot.came(LR, weight_decay=0.1)
    p = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    pt = swap(p)
    s, st = tx.init(p), tx.init(pt)
    step = jax.jit(tx.update)
    for t in range(50):
        g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        u, s = step(g, s, p)
        ut, st = step(swap(g), st, pt)
        np.testing.assert_allclose(
            np.asarray(swap(ut)), np.asarray(u), rtol=1e-5, atol=1e-6, err_msg=str(t)
        )
        p, pt = optax.apply_updates(p, u), optax.apply_updates(pt, ut)
    np.testing.assert_allclose(np.asarray(swap(pt)), np.asarray(p), rtol=1e-5, atol=1e-6)


def test_zero_gradients_give_zero_finite_updates():
    params = {"w": jnp.ones((6, 5)), "k": jnp.ones((2, 3, 4)), "b": jnp.ones((5,)), "s": 1.0}
    tx = ot.came(LR, weight_decay=0.0)
    state = tx.init(params)
    step = jax.jit(tx.update)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):
        u, state = step(zeros, state, params)
    for x in jax.tree.leaves(u):
        np.testing.assert_array_equal(np.asarray(x), 0.0)
    for x in jax.tree.leaves(state):
        assert np.all(np.isfinite(np.asarray(x)))


def test_bf16_params_fp32_state():
    """bf16 gradients: fp32 state, bf16 updates equal to the fp32 computation rounded."""
    rng = np.random.default_rng(5)
    shapes = {"w": (16, 12), "b": (12,), "c": (2, 8, 4)}
    tx = ot.scale_by_came()
    p16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _randn(rng, shapes))
    s16 = tx.init(p16)
    s32 = tx.init(jax.tree.map(lambda x: x.astype(jnp.float32), p16))
    for x in jax.tree.leaves(s16):
        assert x.dtype == jnp.float32
    step = jax.jit(tx.update)
    for _ in range(5):
        g16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _randn(rng, shapes))
        u16, s16 = step(g16, s16)
        u32, s32 = step(jax.tree.map(lambda x: x.astype(jnp.float32), g16), s32)
        for a, b in zip(jax.tree.leaves(u16), jax.tree.leaves(u32), strict=True):
            assert a.dtype == jnp.bfloat16
            assert np.all(np.isfinite(np.asarray(a, np.float32)))
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))


@pytest.mark.parametrize("shape", [(512, 96), (96, 512), (2, 128, 192), (64, 20000)])
def test_cpu_step_writes_no_full_size_temporary(shape):
    """On CPU every factored mean reads the leaf directly (see came._PRIVATE_INPUTS).

    A donated update + apply compiles with temporaries well below the leaf
    (tall, wide, batched, and a kept last axis wider than the column-block
    limit, whose loop holds a few blocks and accumulators); the previous
    implementation (shared producers, matvec means) needed at least one
    full-size temporary per factored leaf.
    """
    if jax.default_backend() != "cpu":
        pytest.skip("the private-input path is the CPU path")
    params = {"w": jnp.ones(shape, jnp.float32)}
    tx = ot.came(1e-3)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 4 * math.prod(shape) / 2, (temp, 4 * math.prod(shape))


# --------------------------------------------------------------------------- state size


def _llama_130m(scanned: bool):
    """LLaMA-130M-shaped params (Flax layout): hidden 768, MLP 2048, 12 layers, vocab 32000."""
    d, f, n_layers, heads, vocab = 768, 2048, 12, 12, 32000
    hd = d // heads
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    lead = (n_layers,) if scanned else ()

    def layer():
        return {
            "attn": {
                "q_proj": {"kernel": sds(*lead, d, heads, hd)},
                "k_proj": {"kernel": sds(*lead, d, heads, hd)},
                "v_proj": {"kernel": sds(*lead, d, heads, hd)},
                "o_proj": {"kernel": sds(*lead, heads, hd, d)},
            },
            "mlp": {
                "gate_proj": {"kernel": sds(*lead, d, f)},
                "up_proj": {"kernel": sds(*lead, d, f)},
                "down_proj": {"kernel": sds(*lead, f, d)},
            },
            "input_norm": {"scale": sds(*lead, d)},
            "post_attn_norm": {"scale": sds(*lead, d)},
        }

    layers = layer() if scanned else {str(i): layer() for i in range(n_layers)}
    return {
        "embed": {"embedding": sds(vocab, d)},
        "layers": layers,
        "final_norm": {"scale": sds(d)},
        "lm_head": {"kernel": sds(d, vocab)},
    }


def _expected_floats(shape, red, out, confidence):
    """Floats of one leaf: mu + (rows + cols) per matrix slice, x2 with confidence."""
    size = math.prod(shape)
    if len(shape) < 2 or red is None:
        return 2 * size
    batch = size // math.prod(shape[a] for a in red + out)
    rows = math.prod(shape[a] for a in out)
    cols = math.prod(shape[a] for a in red)
    return size + (2 if confidence else 1) * batch * (rows + cols)


# Scanned norm scales (L, d) have no matrix view; matrix.py warns about them.
@pytest.mark.parametrize("scanned", [False, True])
@pytest.mark.parametrize("confidence", [True, False])
@pytest.mark.parametrize("use_dims", [False, True])
def test_state_is_rows_plus_cols_per_matrix(scanned, confidence, use_dims):
    params = _llama_130m(scanned)
    dims = ot.default_matrix_dims if use_dims else None
    state = jax.eval_shape(ot.scale_by_came(confidence=confidence, dims=dims).init, params)
    leaves, treedef = jax.tree.flatten(params)
    dims_tree = treedef.flatten_up_to(ot.matrix.matrix_dims_tree(params, dims))
    total = 0
    for (path, x), d in zip(jax.tree_util.tree_leaves_with_path(params), dims_tree, strict=True):
        nd = len(x.shape)
        if not use_dims:
            red, out = (nd - 1,), (nd - 2,)
        elif d is None:  # no matrix view: unfactored
            red, out = None, None
        else:
            red, out = tuple(d.reduction_axes), tuple(d.output_axes)
        per_leaf = [treedef.flatten_up_to(f)[leaves.index(x)] for f in state]
        got = sum(math.prod(s.shape) for s in per_leaf if s is not None)
        for s in per_leaf:
            assert s is None or s.dtype == jnp.float32
        want = _expected_floats(x.shape, red, out, confidence)
        assert got == want, f"{jax.tree_util.keystr(path)}: {got} state floats, want {want}"
        total += want
    n = sum(math.prod(x.shape) for x in leaves)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(state)) == total
    if not use_dims:
        # Closed form: mn + k(m + n) per 2-D matrix (slice), k = 2 with confidence;
        # q/k/v (d, h, hd) as d slices of h x hd, o_proj (h, hd, d) as h slices of hd x d.
        d, f, vocab, L, h, hd = 768, 2048, 32000, 12, 12, 64
        k = 2 if confidence else 1
        mat = lambda m_, n_: m_ * n_ + k * (m_ + n_)
        per_layer = 3 * d * mat(h, hd) + h * mat(hd, d) + 3 * mat(d, f)
        # norm scales: unfactored (d,) per layer, or one factored (L, d) array when scanned
        norms = 2 * mat(L, d) if scanned else L * 2 * (2 * d)
        want_total = 2 * mat(vocab, d) + L * per_layer + norms + 2 * d
        assert total == want_total
        assert n == 2 * vocab * d + L * (4 * d * d + 3 * d * f + 2 * d) + d


def test_state_leaves_shapes_follow_reference():
    """Row stats ``shape[:-1]``, col stats ``shape[:-2] + shape[-1:]`` (default layout)."""
    params = {"k": jnp.zeros((3, 5, 7)), "w": jnp.zeros((5, 7)), "v": jnp.zeros((7,))}
    s = ot.scale_by_came().init(params)
    assert s.nu_row["k"].shape == s.res_row["k"].shape == (3, 5)
    assert s.nu_col["k"].shape == s.res_col["k"].shape == (3, 7)
    assert s.nu_row["w"].shape == (5,) and s.nu_col["w"].shape == (7,)
    assert s.nu["v"].shape == (7,) and s.nu["k"] is None and s.nu_row["v"] is None


# --------------------------------------------------------------------------- options


def test_matrix_dims_factors_heads_into_output():
    """``dims=default_matrix_dims``: q_proj (d, h, hd) factors like the (d, h*hd) matrix."""
    rng = np.random.default_rng(6)
    d, h, hd = 8, 2, 4
    tx_view = ot.scale_by_came(dims=ot.default_matrix_dims)
    tx_flat = ot.scale_by_came()
    p3 = {"q_proj": {"kernel": jnp.zeros((d, h, hd))}}
    p2 = {"q_proj": {"kernel": jnp.zeros((d, h * hd))}}
    s3, s2 = tx_view.init(p3), tx_flat.init(p2)
    assert s3.nu_row["q_proj"]["kernel"].shape == (1, h, hd)  # mean over the fan-in axis d
    assert s3.nu_col["q_proj"]["kernel"].shape == (d, 1, 1)
    # The reference layout factors (h, hd) slices with d as batch: different numbers.
    s_ref = tx_flat.init(p3)
    view_step, flat_step = jax.jit(tx_view.update), jax.jit(tx_flat.update)
    differs = False
    for _ in range(5):
        g = jnp.asarray(rng.standard_normal((d, h, hd)), jnp.float32)
        u3, s3 = view_step({"q_proj": {"kernel": g}}, s3)
        u2, s2 = flat_step({"q_proj": {"kernel": g.reshape(d, h * hd)}}, s2)
        ur, s_ref = flat_step({"q_proj": {"kernel": g}}, s_ref)
        a, b = np.asarray(u3["q_proj"]["kernel"]), np.asarray(u2["q_proj"]["kernel"])
        scale = np.max(np.abs(b))
        np.testing.assert_allclose(a.reshape(d, h * hd), b, rtol=1e-5, atol=1e-6 * scale)
        differs |= not np.allclose(np.asarray(ur["q_proj"]["kernel"]), a, rtol=1e-3)
    assert differs


def test_cautious_masks_disagreeing_coordinates():
    rng = np.random.default_rng(7)
    tx = ot.came(LR, cautious=True)
    p = {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)}
    s = tx.init(p)
    step = jax.jit(tx.update)
    for _ in range(4):
        g = {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)}
        u, s = step(g, s, p)
        # the update is -lr * direction: it is zero wherever direction * g <= 0
        agree = np.asarray(-u["w"] * g["w"]) > 0
        assert np.all(np.asarray(u["w"])[~agree] == 0)
    assert (~agree).any() and agree.any()


def test_nonfinite_gradient_is_skipped():
    tx = ot.came(LR, skip_nonfinite=True)
    p = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    s = tx.init(p)
    g = {"w": jnp.ones((4, 3)), "b": jnp.asarray([1.0, jnp.nan, 1.0])}
    u, s1 = jax.jit(tx.update)(g, s, p)
    for x in jax.tree.leaves(u):
        np.testing.assert_array_equal(np.asarray(x), 0.0)
    for a, b in zip(jax.tree.leaves(s.inner_state), jax.tree.leaves(s1.inner_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"b1": 1.0}, "b1"),
        ({"b2": -0.1}, "b2"),
        ({"b3": 1.5}, "b3"),
        ({"eps": (1e-30,)}, "eps"),
        ({"eps": (0.0, 1e-16)}, "eps[0]"),
        ({"clip_threshold": 0.0}, "clip_threshold"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"learning_rate": -1e-3}, "learning_rate"),
    ],
)
def test_invalid_hyperparameters(kwargs, arg):
    kwargs = {"learning_rate": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=arg.replace("[", r"\[").replace("]", r"\]")):
        ot.came(**kwargs)


def test_registry_builds_came():
    assert "came" in ot.names()
    hp = ot.hyperparameters("came")
    assert hp["b3"] == 0.9999 and hp["eps"] == (1e-30, 1e-16) and hp["cautious"] is False
    tx = ot.build("came", learning_rate=1e-3, weight_decay=0.01)
    p = {"w": jnp.ones((3, 2))}
    u, _ = tx.update(p, tx.init(p), p)
    assert u["w"].shape == (3, 2)
    assert isinstance(ot.build_transform("scale_by_came", b1=0.8), optax.GradientTransformation)
