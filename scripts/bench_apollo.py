"""APOLLO (rank 256) and APOLLO-Mini vs optax.adamw: state bytes and update time, in one run.

The param tree has the shapes of a 12-layer LLaMA-130M (hidden 768,
intermediate 2048, 12 heads, vocab 32000; Flax ``(in, out)`` kernels, one
leaf per layer; ~134M float32 params). APOLLO handles the 84 attention/MLP
matrices; embedding, LM head and norm scales use its AdamW fallback.

Each optimizer runs as one jitted ``tx.update`` (gradients, state, params ->
updates, state) with the state donated, after warm-up steps; params and
gradients are shared, so one copy of each is live. The optimizers are timed
interleaved (each round times each optimizer once, in turn); the script
prints the median step time over rounds and the median of the per-round
ratio to `optax.adamw`, plus the optimizer-state bytes from `jax.eval_shape`
(total, and on the APOLLO-routed matrices alone). The named APOLLO
optimizers include `optax.apply_if_finite` (``skip_nonfinite=True``);
``apollo_raw`` is APOLLO without it.

Usage::

    python scripts/bench_apollo.py [--rounds 7] [--warmup 2] [--small]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import optim_transforms as ot


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> dict:
    """Param shapes of a LLaMA, Flax ``(in, out)`` layout, one dict per layer."""
    layer = {
        "attn": {k: {"kernel": (hidden, hidden)} for k in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {
            "gate_proj": {"kernel": (hidden, intermediate)},
            "up_proj": {"kernel": (hidden, intermediate)},
            "down_proj": {"kernel": (intermediate, hidden)},
        },
        "attn_norm": {"scale": (hidden,)},
        "mlp_norm": {"scale": (hidden,)},
    }
    return {
        "embed": {"embedding": (vocab, hidden)},
        "layers": {str(i): layer for i in range(layers)},
        "norm": {"scale": (hidden,)},
        "lm_head": {"kernel": (hidden, vocab)},
    }


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def make_tree(shapes: dict, seed: int, scale: float) -> dict:
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    make = jax.jit(lambda k, s: scale * jax.random.normal(k, s, jnp.float32), static_argnums=1)
    return jax.tree.unflatten(treedef, [make(k, s) for k, s in zip(keys, leaves)])


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a 4-layer, hidden-256 tree (smoke run)")
    args = ap.parse_args()

    shapes = llama_shapes(256, 688, 4, 4096) if args.small else llama_shapes(768, 2048, 12, 32000)
    rank = 64 if args.small else 256
    lr = 1e-2
    optimizers = {
        "adamw": optax.adamw(lr),
        f"apollo_r{rank}": ot.apollo(lr, rank=rank),
        "apollo_raw": ot.apollo(lr, rank=rank, skip_nonfinite=False),
        "apollo_mini": ot.apollo_mini(lr),
    }
    params = make_tree(shapes, 0, 0.02)
    grads = make_tree(shapes, 1, 1e-3)
    n = sum(x.size for x in jax.tree.leaves(params))
    labels = jax.tree.leaves(ot.matrix_labels(params))
    mats = [p for p, lab in zip(jax.tree.leaves(params), labels) if lab == "matrix"]
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device), "
        f"{n / 1e6:.1f}M fp32 params, {len(mats)} APOLLO matrices "
        f"({sum(x.size for x in mats) / 1e6:.1f}M params)"
    )

    abstract = {name: jax.eval_shape(tx.init, params) for name, tx in optimizers.items()}
    runs = {}
    for name, tx in optimizers.items():
        state = jax.jit(tx.init)(params)
        step = jax.jit(tx.update, donate_argnums=(1,))
        for _ in range(args.warmup):
            updates, state = step(grads, state, params)
        jax.block_until_ready((updates, state))
        del updates
        runs[name] = [step, state]

    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            step, state = run
            t0 = time.perf_counter()
            updates, state = step(grads, state, params)
            jax.block_until_ready((updates, state))
            times[name].append(time.perf_counter() - t0)
            run[1] = state
            del updates

    adamw_b = nbytes(abstract["adamw"])
    adamw_mats_b = 2 * 4 * sum(x.size for x in mats)
    print(
        f"\n{'optimizer':<12} {'state MB':>9} {'/adamw':>7} {'matrix MB':>10} {'/adamw':>8} "
        f"{'step ms':>8} {'/adamw':>7}"
    )
    for name in runs:
        st = abstract[name]
        b = nbytes(st)
        if name == "adamw":
            mb = adamw_mats_b
        else:
            inner = st.inner_state if hasattr(st, "notfinite_count") else st
            mb = nbytes(inner[0].inner_states["matrix"])
        med = statistics.median(times[name])
        ratio = statistics.median(t / a for t, a in zip(times[name], times["adamw"]))
        print(
            f"{name:<12} {b / 2**20:9.1f} {b / adamw_b:7.3f} {mb / 2**20:10.2f} "
            f"{mb / adamw_mats_b:8.4f} {1e3 * med:8.1f} {ratio:7.2f}"
        )
    print(
        f"\nmedian of {args.rounds} interleaved rounds after {args.warmup} warm-up steps; "
        "ratios are per-round ratios, medianed. 'matrix' = state of the APOLLO-routed "
        "matrices (for adamw: its 2 moments on the same matrices)."
    )


if __name__ == "__main__":
    main()
