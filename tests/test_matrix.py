"""Matrix view of n-D params, default dims by path, labels for partition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim_transforms import matrix as mx
from optim_transforms.matrix import MatrixDims


@pytest.mark.parametrize(
    "path,shape,want",
    [
        ("dense/kernel", (8, 12), MatrixDims((0,), (1,))),
        ("layers/0/mlp/up_proj/kernel", (8, 12), MatrixDims((0,), (1,))),
        ("layers/mlp/up_proj/kernel", (3, 8, 12), MatrixDims((1,), (2,))),
        ("attn/q_proj/kernel", (16, 4, 8), MatrixDims((0,), (1, 2))),
        ("attn/o_proj/kernel", (4, 8, 16), MatrixDims((0, 1), (2,))),
        ("layers/attn/k_proj/kernel", (3, 16, 4, 8), MatrixDims((1,), (2, 3))),
        ("layers/attn/o_proj/kernel", (3, 4, 8, 16), MatrixDims((1, 2), (3,))),
        ("norm/scale", (8,), None),
        ("scalar", (), None),
    ],
)
def test_default_matrix_dims(path, shape, want):
    assert mx.default_matrix_dims(path, shape) == want


def test_unknown_high_rank_leaf_warns_once_and_is_elementwise():
    with pytest.warns(UserWarning, match="conv/kernel_4d"):
        assert mx.default_matrix_dims("conv/kernel_4d", (3, 3, 4, 8)) is None
    # Second time: no warning (would raise under -W error).
    assert mx.default_matrix_dims("conv/kernel_4d", (3, 3, 4, 8)) is None


@pytest.mark.parametrize(
    "shape,dims,view",
    [
        ((8, 12), MatrixDims((0,), (1,)), (1, 12, 8)),
        ((3, 8, 12), MatrixDims((1,), (2,)), (3, 12, 8)),
        ((16, 4, 8), MatrixDims((0,), (1, 2)), (1, 32, 16)),
        ((4, 8, 16), MatrixDims((0, 1), (2,)), (1, 16, 32)),
        ((2, 3, 16, 4, 8), MatrixDims((2,), (3, 4)), (6, 32, 16)),
    ],
)
def test_to_from_matrix_roundtrip_and_layout(shape, dims, view):
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    y = mx.to_matrix(x, dims)
    assert y.shape == view
    np.testing.assert_array_equal(mx.from_matrix(y, dims, shape), x)


def test_to_matrix_is_pytorch_layout_of_flax_kernel():
    """A Flax (in, out) kernel K becomes W = K^T, the PyTorch (out, in) weight."""
    k = jax.random.normal(jax.random.key(0), (5, 7))
    np.testing.assert_array_equal(mx.to_matrix(k, MatrixDims())[0], k.T)


def test_invalid_dims_rejected():
    with pytest.raises(ValueError, match="invalid MatrixDims"):
        mx.to_matrix(jnp.zeros((4, 4)), MatrixDims((0,), (0,)))
    with pytest.raises(ValueError, match="invalid MatrixDims"):
        mx.to_matrix(jnp.zeros((4, 4)), MatrixDims((0,), (2,)))


def test_map_matrices_row_sums_in_out_in_view():
    """fn sees (out, in): summing over axis 1 sums over the Flax input axis 0."""
    params = {
        "dense": {"kernel": jax.random.normal(jax.random.key(1), (6, 4))},
        "layers": {"mlp": {"kernel": jax.random.normal(jax.random.key(2), (3, 6, 4))}},
        "bias": jnp.ones((4,)),
    }
    out = mx.map_matrices(
        lambda g: jnp.broadcast_to(g.sum(axis=1, keepdims=True), g.shape),
        params,
        other=lambda b: 2 * b,
    )
    k = params["dense"]["kernel"]
    np.testing.assert_allclose(
        out["dense"]["kernel"], jnp.broadcast_to(k.sum(0), k.shape), rtol=1e-6
    )
    s = params["layers"]["mlp"]["kernel"]
    np.testing.assert_allclose(
        out["layers"]["mlp"]["kernel"],
        jnp.broadcast_to(s.sum(1, keepdims=True), s.shape),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(out["bias"], 2 * params["bias"])


def test_matrix_labels_default_routing():
    params = {
        "embed": {"embedding": jnp.zeros((32, 8))},
        "lm_head": {"kernel": jnp.zeros((8, 32))},
        "layers": {"0": {"attn": {"q_proj": {"kernel": jnp.zeros((8, 8))}}}},
        "norm": {"scale": jnp.zeros((8,))},
        "thin": {"kernel": jnp.zeros((1, 8))},
    }
    labels = mx.matrix_labels(params)
    assert labels == {
        "embed": {"embedding": "adamw"},
        "lm_head": {"kernel": "adamw"},
        "layers": {"0": {"attn": {"q_proj": {"kernel": "matrix"}}}},
        "norm": {"scale": "adamw"},
        "thin": {"kernel": "adamw"},
    }
    assert mx.matrix_labels(params, exclude=None)["embed"]["embedding"] == "matrix"


def test_partition_matrices_routes():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    tx = mx.partition_matrices(optax.scale(2.0), optax.scale(-1.0))
    u, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_array_equal(u["w"], 2 * params["w"])
    np.testing.assert_array_equal(u["b"], -params["b"])
