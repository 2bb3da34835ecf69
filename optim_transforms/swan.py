"""SWAN: SGD with gradient Whitening And Normalization (stateless for matrices).

Each matrix gradient ``G`` (``m = out`` rows, ``n = in`` columns in the
internal ``(out, in)`` view of `optim_transforms.matrix`) goes through

1. `grad_norm`: standardize each output unit over its inputs;
2. `whiten`: replace the result by its polar factor ``(G G^T)^{-1/2} G = U V^T``
   (coupled Newton-Schulz in float32, or an exact SVD reference), rescaled so
   that its Frobenius norm matches its input's (``scale="norm_match"``);
3. an SGD step (``add_decayed_weights`` and ``scale_by_learning_rate``).

Nothing is stored for matrix params. 1-D params, embeddings and the LM head
(see `optim_transforms.matrix.matrix_labels`) go to AdamW.

References:
  Ma, Gong, Scetbon, Meeds. "SWAN: SGD with Normalization and Whitening
  Enables Stateless LLM Training", arXiv:2412.13148 (ICML 2025).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optim_transforms import validate as V
from optim_transforms.cautious import maybe_cautious
from optim_transforms.matrix import map_matrices, matrix_labels, partition_matrices

__all__ = ["grad_norm", "whiten", "swan", "METHODS", "SCALES"]

METHODS = ("newton_schulz", "svd")
SCALES = ("norm_match", "none")

# The defaults shared by `grad_norm`/`whiten` and `swan`, written once
# (ALGORITHMS.md §1.3).
_NORM_EPS = 1e-8
_WHITEN_EPS = 1e-8
_NS_STEPS = 10
_NS_COEFF = 0.5
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    # Full fp32 matmuls: TF32/bf16 passes would spoil Newton-Schulz on GPU/TPU.
    return jnp.matmul(a, b, precision=_HIGHEST)


# --------------------------------------------------------------------------- GradNorm


def _standardize_rows(g: jax.Array, eps: Any) -> jax.Array:
    """``(G - mean) / sqrt(var + eps)`` of each row of an ``(out, in)`` matrix, over axis 1."""
    x = g.astype(jnp.float32)
    mu = jnp.mean(x, axis=1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, axis=1, keepdims=True)  # biased estimator, as the paper
    return (xc * jax.lax.rsqrt(var + eps)).astype(g.dtype)


def grad_norm(*, eps: float = _NORM_EPS, dims: Any = None) -> optax.GradientTransformation:
    """SWAN GradNorm: standardize each output unit's gradient over its inputs.

    For every matrix slice ``G`` (``m = out``, ``n = in``):
    ``mu_i = mean_j G_ij``, ``sigma_i = sqrt(mean_j (G_ij - mu_i)^2 + eps)``,
    ``G_ij <- (G_ij - mu_i) / sigma_i`` (biased std, ``eps`` inside the root).

    The reduction is over the **input** (fan-in) axes, once per output unit:

    * Flax ``Dense`` kernel ``(in, out)``: axis 0, one mean/std per column;
    * PyTorch ``Linear`` weight ``(out, in)``: axis 1, one mean/std per row
      (pass ``dims=MatrixDims(reduction_axes=(1,), output_axes=(0,))``);
    * n-D leaves: over their ``reduction_axes`` (e.g. axis 0 of a q/k/v kernel
      ``(d, heads, head_dim)``, one mean/std per ``(head, head_dim)``; batch
      axes such as a scanned layer axis are separate matrices).

    Leaves without a matrix view (scalars, 1-D leaves, higher-rank leaves no
    rule recognises) pass through **unchanged**; `swan` routes those to AdamW.
    Statistics are computed in float32; the output has the input's dtype. A
    zero gradient gives a zero output.

    Args:
      eps: added to the variance inside the square root.
      dims: matrix view spec (see `optim_transforms.matrix.matrix_dims_tree`);
        None uses the defaults from each leaf's path and shape.

    Returns:
      A stateless `optax.GradientTransformation` (`optax.EmptyState`).

    References:
      Ma et al., arXiv:2412.13148, Algorithm 3 (GradNorm).
    """
    V.check_nonnegative("grad_norm", "eps", eps)

    def update_fn(updates, state, params=None):
        del params
        return map_matrices(lambda g: _standardize_rows(g, eps), updates, dims), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# --------------------------------------------------------------------------- GradWhitening


def _ns_polar(g: jax.Array, steps: Any, coeff: Any, eps: Any) -> jax.Array:
    """Coupled Newton-Schulz polar factor of one fp32 ``(m, n)`` matrix (ALGORITHMS.md §1.2).

    Works on the smaller side ``X`` (``p = min(m, n)`` rows): ``Xb = X / (||X||_F + eps)``,
    ``A = Xb Xb^T``, ``Y = A``, ``Z = I``; ``steps`` times ``T = coeff (3I - Z Y)``,
    ``Y <- Y T``, ``Z <- T Z``; returns ``Z Xb`` (transposed back).
    """
    m, n = g.shape
    flip = m > n
    x = g.T if flip else g
    p = x.shape[0]
    x = x / (jnp.sqrt(jnp.sum(x * x)) + eps)
    eye = jnp.eye(p, dtype=jnp.float32)

    def body(_, yz):
        y, z = yz
        t = coeff * (3.0 * eye - _mm(z, y))
        return _mm(y, t), _mm(t, z)

    _, z = jax.lax.fori_loop(0, steps, body, (_mm(x, x.T), eye))
    out = _mm(z, x)
    return out.T if flip else out


def _svd_polar(g: jax.Array) -> jax.Array:
    """Exact polar factor ``U_r V_r^T`` of one fp32 matrix (pseudo-inverse for low rank).

    Singular values ``<= max(m, n) * eps_f32 * s_max`` are dropped.
    """
    u, s, vt = jnp.linalg.svd(g, full_matrices=False)
    tol = max(g.shape) * jnp.finfo(jnp.float32).eps * jnp.max(s)
    keep = (s > tol).astype(jnp.float32)
    return _mm(u * keep[None, :], vt)


def whiten(
    *,
    method: str = "newton_schulz",
    ns_steps: int = _NS_STEPS,
    ns_coeff: float = _NS_COEFF,
    eps: float = _WHITEN_EPS,
    scale: str = "norm_match",
    dims: Any = None,
) -> optax.GradientTransformation:
    """SWAN GradWhitening: replace each matrix gradient by its polar factor.

    For every matrix slice ``G`` (``m = out``, ``n = in``; batch axes such as
    scanned layers are separate slices, mapped with `jax.vmap`) the output is
    ``c * (G G^T)^{-1/2} G = c * U V^T`` (``G = U S V^T``; for a rank-deficient
    ``G`` the pseudo-inverse, ``U_r V_r^T``). The polar factor is layout-free
    (``polar(G^T) = polar(G)^T``), so unlike `grad_norm` the result does not
    depend on whether the leaf is Flax ``(in, out)`` or PyTorch ``(out, in)``.

    * ``method="newton_schulz"``: coupled Newton-Schulz on the Gram matrix of
      the smaller side ``X`` (``p = min(m, n)``): ``Xb = X / (||X||_F + eps)``,
      ``A = Xb Xb^T``, ``Y_0 = A``, ``Z_0 = I``; ``ns_steps`` times
      ``T = ns_coeff (3I - Z Y)``, ``Y <- Y T``, ``Z <- T Z``; output ``Z Xb``.
      ``Z`` tends to ``A^{-1/2}`` only for ``ns_coeff = 0.5``; an eigenvalue
      ``lam`` of ``A`` converges in about ``log(1/lam)/log(2.25)`` steps (10
      steps reach ``lam ~ 1e-4``, i.e. condition numbers up to ~100/sqrt(p)).
    * ``method="svd"``: the exact reference, ``U V^T`` over the singular
      values above ``max(m, n) * eps_f32 * s_max``.

    ``scale`` sets the constant ``c``:

    * ``"norm_match"`` (default): ``c = ||G||_F / max(||U V^T||_F, eps)`` per
      slice, so the output has the Frobenius norm of the input. After
      `grad_norm`, ``||G||_F ~ sqrt(m n)``, so the update's entry-RMS is about
      1 and AdamW learning rates transfer. The constant lives here, not in
      `swan`, because it needs only this transform's own input and output per
      slice; it makes `whiten` a norm-preserving change of direction that can
      be placed anywhere in a chain.
    * ``"none"``: ``c = 1`` (the bare polar factor, entry-RMS
      ``sqrt(rank / (m n))``).

    All the maths is float32 (matmuls at `jax.lax.Precision.HIGHEST`); the
    output has the input's dtype. A zero gradient gives a zero output. Leaves
    without a matrix view pass through unchanged.

    Args:
      method: ``"newton_schulz"`` or ``"svd"``.
      ns_steps: Newton-Schulz iterations ``K`` (paper range 5-15).
      ns_coeff: the ``1/2`` in ``T = 1/2 (3I - Z Y)``; other values (some
        ports use 0.4 or 0.8) do not converge to the polar factor.
      eps: guard of the Frobenius pre-scaling and of the ``norm_match`` divisor.
      scale: ``"norm_match"`` or ``"none"``.
      dims: matrix view spec (see `optim_transforms.matrix.matrix_dims_tree`).

    Returns:
      A stateless `optax.GradientTransformation` (`optax.EmptyState`).

    References:
      Ma et al., arXiv:2412.13148, Algorithm 2 (GradWhitening).
    """
    fn = "whiten"
    V.check_choice(fn, "method", method, METHODS)
    V.check_choice(fn, "scale", scale, SCALES)
    V.check_int(fn, "ns_steps", ns_steps)
    V.check_positive(fn, "ns_coeff", ns_coeff)
    V.check_nonnegative(fn, "eps", eps)

    def one(g: jax.Array) -> jax.Array:
        x = g.astype(jnp.float32)
        out = _svd_polar(x) if method == "svd" else _ns_polar(x, ns_steps, ns_coeff, eps)
        if scale == "norm_match":
            out_norm = jnp.sqrt(jnp.sum(out * out))
            out = out * (jnp.sqrt(jnp.sum(x * x)) / jnp.maximum(out_norm, eps))
        return out.astype(g.dtype)

    def update_fn(updates, state, params=None):
        del params
        return map_matrices(one, updates, dims), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# --------------------------------------------------------------------------- SWAN


def swan(
    learning_rate: optax.ScalarOrSchedule,
    *,
    method: str = "newton_schulz",
    ns_steps: int = _NS_STEPS,
    ns_coeff: float = _NS_COEFF,
    norm_eps: float = _NORM_EPS,
    whiten_eps: float = _WHITEN_EPS,
    scale: str = "norm_match",
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    dims: Any = None,
    labels: Any = None,
    cautious: bool = False,
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SWAN: `grad_norm` -> `whiten` -> SGD for matrices, AdamW for the rest.

    Matrix params (``"matrix"`` label): ``chain(grad_norm, whiten,
    add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))``,
    i.e. ``theta <- theta - lr * (c * polar(GradNorm(G)) + weight_decay * theta)``
    with no optimizer state. Everything else (``"adamw"`` label: 1-D and 0-D
    params, embeddings, the LM head, leaves with ``min(m, n) = 1``, see
    `optim_transforms.matrix.matrix_labels`): AdamW with ``b1, b2, eps``, the
    same ``weight_decay`` and ``learning_rate``.

    With ``cautious=True`` both the SWAN direction (grad_norm + whiten) and the
    Adam direction go through `optim_transforms.cautious.cautious_mask`
    (masked against the raw gradient); weight decay is never masked.

    Learning rates: with ``scale="norm_match"`` the matrix update has entry-RMS
    about 1, like Adam's, so start from the AdamW learning rate and sweep.
    Under `optax.inject_hyperparams` the integer ``ns_steps`` becomes an array
    (the loop then runs as a `jax.lax.while_loop`); list it in ``static_args``
    to keep it a Python int.

    Args:
      learning_rate: float or optax schedule, shared by both groups.
      method: whitening method, ``"newton_schulz"`` or ``"svd"`` (see `whiten`).
      ns_steps: Newton-Schulz iterations.
      ns_coeff: Newton-Schulz coefficient (0.5 converges to the polar factor).
      norm_eps: `grad_norm`'s variance guard.
      whiten_eps: `whiten`'s pre-scaling and ``norm_match`` guard.
      scale: post-whitening constant, ``"norm_match"`` or ``"none"`` (see
        `whiten`); log it with the run, the paper text does not fix it.
      weight_decay: decoupled weight decay (multiplied by the learning rate),
        applied to every param.
      b1, b2, eps: AdamW hyperparameters of the fallback group.
      dims: matrix view spec for labelling and for the matrix transforms.
      labels: None (`matrix_labels` on the params with ``dims``), a callable
        ``params -> labels`` or a label tree with values ``"matrix"`` /
        ``"adamw"``. A leaf labelled ``"matrix"`` without a matrix view is
        passed through grad_norm/whiten unchanged (plain SGD).
      cautious: mask both directions with `cautious_mask` (see above).
      skip_nonfinite: skip steps whose gradient has a NaN/Inf (see
        `optim_transforms.validate.finalize`).

    Returns:
      A `optax.GradientTransformationExtraArgs`. Its state holds the AdamW
      moments of the fallback group only (plus scalar counters).

    References:
      Ma, Gong, Scetbon, Meeds. "SWAN: SGD with Normalization and Whitening
      Enables Stateless LLM Training", arXiv:2412.13148.
    """
    fn = "swan"
    V.check_learning_rate(fn, learning_rate)
    V.check_nonnegative(fn, "weight_decay", weight_decay)
    V.check_beta(fn, "b1", b1)
    V.check_beta(fn, "b2", b2)
    V.check_nonnegative(fn, "eps", eps)
    V.check_nonnegative(fn, "norm_eps", norm_eps)
    V.check_choice(fn, "method", method, METHODS)
    V.check_choice(fn, "scale", scale, SCALES)
    V.check_int(fn, "ns_steps", ns_steps)
    V.check_positive(fn, "ns_coeff", ns_coeff)
    V.check_nonnegative(fn, "whiten_eps", whiten_eps)
    direction = optax.chain(
        grad_norm(eps=norm_eps, dims=dims),
        whiten(
            method=method,
            ns_steps=ns_steps,
            ns_coeff=ns_coeff,
            eps=whiten_eps,
            scale=scale,
            dims=dims,
        ),
    )
    matrix_tx = optax.chain(
        maybe_cautious(direction, cautious),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    adamw_tx = optax.chain(
        maybe_cautious(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), cautious),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    if labels is None:
        labels = lambda params: matrix_labels(params, dims=dims)
    tx = partition_matrices(matrix_tx, adamw_tx, labels=labels)
    return V.finalize(tx, skip_nonfinite=skip_nonfinite)
