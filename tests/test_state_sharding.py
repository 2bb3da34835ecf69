"""optim_transforms.sharding.state_shardings on hand-made states."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from optim_transforms.sharding import init_sharded, state_shardings


class _Factored(NamedTuple):
    row: jax.Array
    col: jax.Array
    low: jax.Array
    count: jax.Array


def _factored_tx():
    def init(params):
        return jax.tree.map(
            lambda p: _Factored(
                row=jnp.zeros(p.shape[:-1]),
                col=jnp.zeros(p.shape[:-2] + p.shape[-1:]),
                low=jnp.zeros(p.shape[:-1] + (2,)),
                count=jnp.zeros([], jnp.int32),
            ),
            params,
        )

    return optax.GradientTransformation(init, lambda u, s, p=None: (u, s))


def _mesh():
    return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def test_adam_moments_follow_params_count_replicated():
    mesh = _mesh()
    params = {"w": jnp.zeros((8, 16)), "b": jnp.zeros((16,))}
    shard = {"w": NamedSharding(mesh, P("data", "fsdp")), "b": NamedSharding(mesh, P("fsdp"))}
    got = state_shardings(optax.adam(1e-3), params, shard, mesh)
    assert got[0].mu["w"].spec == P("data", "fsdp")
    assert got[0].nu["b"].spec == P("fsdp")
    assert got[0].count.spec == P()


def test_factored_and_low_rank_keep_the_kept_axis():
    mesh = _mesh()
    params = {"w": jnp.zeros((8, 16))}
    shard = {"w": NamedSharding(mesh, P("data", "fsdp"))}
    got = state_shardings(_factored_tx(), params, shard, mesh)["w"]
    assert got.row.spec == P("data")  # reduced the last axis, keeps axis 0's mesh axis
    assert got.col.spec == P("fsdp")  # reduced axis 0
    assert got.low.spec == P("data", None)  # low-rank axis of size 2 replicated
    assert got.count.spec == P()


def test_indivisible_axis_is_replicated():
    mesh = _mesh()
    params = {"w": jnp.zeros((8, 16))}
    shard = {"w": NamedSharding(mesh, P("data", "fsdp"))}

    def init(p):
        return {"w": jnp.zeros((8, 6))}  # 6 is not divisible by fsdp=4

    tx = optax.GradientTransformation(init, lambda u, s, p=None: (u, s))
    assert state_shardings(tx, params, shard, mesh)["w"].spec == P("data", None)


def test_init_sharded_places_state():
    mesh = _mesh()
    shard = {"w": NamedSharding(mesh, P("data", "fsdp"))}
    params = jax.device_put({"w": jnp.ones((8, 16))}, shard)
    state = init_sharded(optax.adam(1e-3), params, mesh)
    assert state[0].mu["w"].sharding.is_equivalent_to(shard["w"], 2)
    assert len(state[0].count.sharding.device_set) == 8
