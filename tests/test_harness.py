"""The harness itself, exercised on optax.adamw and transforms of ours."""

import jax.numpy as jnp
import optax
import pytest

import optim_transforms as ot
from tests import harness


@pytest.mark.parametrize("check", harness.CHECKS)
def test_harness_adamw(check):
    harness.run_check(check, optax.adamw, {"learning_rate": 1e-2})


@pytest.mark.parametrize("check", harness.CHECKS)
def test_harness_cautious_adamw(check):
    harness.run_check(check, ot.cautious_adamw, {"learning_rate": 1e-2})


def test_harness_catches_dtype_change():
    """A transform that returns float32 for bf16 params must fail the harness."""

    def upcast():
        return optax.stateless(lambda u, p: optax.tree.cast(u, "float32"))

    with pytest.raises(AssertionError, match="dtype"):
        harness.run_check("dtypes", upcast)


def _growing_state():
    """A broken transform: its state grows by one element per step."""

    def init(params):
        return jnp.zeros((1,))

    def update(updates, state, params=None):
        return updates, jnp.concatenate([state, jnp.zeros((1,))])

    return optax.GradientTransformation(init, update)


def test_harness_catches_retrace():
    with pytest.raises(AssertionError, match="traced"):
        harness.run_check("compiles_once", _growing_state)


def test_harness_catches_state_change():
    with pytest.raises(AssertionError):
        harness.run_check("state_structure", _growing_state)
