"""CAME vs optax.adamw and optax.adafactor: state bytes and update time, in one run.

The param tree has the shapes of a 12-layer LLaMA-130M (hidden 768,
intermediate 2048, 12 heads, vocab 32000; Flax ``(in, out)`` kernels, one
leaf per layer, as in ``models/llama.py``; ~134M float32 params). Every
optimizer runs as one jitted ``update + apply_updates`` step with params and
optimizer state donated, after warm-up steps. The optimizers are timed
interleaved (each round times each optimizer once, in turn); the script
prints the median over rounds of each step time and of its ratio to
`optax.adamw` and `optax.adafactor` measured in the same round, plus the
optimizer-state bytes from `jax.eval_shape`.

``came`` is the default named optimizer (wrapped in `optax.apply_if_finite`,
``skip_nonfinite=True``); ``came_raw`` is the same without that wrapper, the
like-for-like comparison with the bare optax optimizers.

Usage::

    python scripts/bench_came.py [--rounds 10] [--warmup 2] [--small]
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
        "attn": {
            "q_proj": {"kernel": (hidden, hidden)},
            "k_proj": {"kernel": (hidden, hidden)},
            "v_proj": {"kernel": (hidden, hidden)},
            "o_proj": {"kernel": (hidden, hidden)},
        },
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


def state_bytes(tx: optax.GradientTransformation, params) -> int:
    abstract = jax.eval_shape(tx.init, params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))


def make_step(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a 4-layer, hidden-256 tree (smoke run)")
    args = ap.parse_args()

    if args.small:
        shapes = llama_shapes(256, 688, 4, 4096)
    else:
        shapes = llama_shapes(768, 2048, 12, 32000)
    lr = 1e-3
    optimizers = {
        "adamw": optax.adamw(lr),
        "adafactor": optax.adafactor(lr),
        "came": ot.came(lr),
        "came_raw": ot.came(lr, skip_nonfinite=False),
    }
    params0 = make_tree(shapes, 0, 0.02)
    grads = make_tree(shapes, 1, 1e-3)
    n = sum(x.size for x in jax.tree.leaves(params0))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {n / 1e6:.1f}M fp32 params")

    runs = {}
    for name, tx in optimizers.items():
        params = jax.tree.map(jnp.copy, params0)
        state = jax.jit(tx.init)(params)
        step = make_step(tx)
        for _ in range(args.warmup):
            params, state = step(params, state, grads)
        jax.block_until_ready(params)
        runs[name] = [step, params, state]
    del params0

    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            step, params, state = run
            t0 = time.perf_counter()
            params, state = step(params, state, grads)
            jax.block_until_ready((params, state))
            times[name].append(time.perf_counter() - t0)
            run[1], run[2] = params, state

    adamw_b = state_bytes(optimizers["adamw"], grads)
    fact_b = state_bytes(optimizers["adafactor"], grads)
    print(
        f"\n{'optimizer':<10} {'state MB':>9} {'/adamw':>7} {'/adafactor':>10} "
        f"{'step ms':>8} {'/adamw':>7} {'/adafactor':>10}"
    )
    for name in runs:
        b = state_bytes(optimizers[name], grads)
        med = statistics.median(times[name])
        r_adamw = statistics.median(t / a for t, a in zip(times[name], times["adamw"]))
        r_fact = statistics.median(t / a for t, a in zip(times[name], times["adafactor"]))
        print(
            f"{name:<10} {b / 2**20:9.1f} {b / adamw_b:7.3f} {b / fact_b:10.2f} "
            f"{1e3 * med:8.1f} {r_adamw:7.2f} {r_fact:10.2f}"
        )
    print(
        f"\nmedian of {args.rounds} interleaved rounds after {args.warmup} warm-up steps; "
        "ratios are per-round ratios, medianed"
    )


if __name__ == "__main__":
    main()
