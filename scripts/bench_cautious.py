"""Update time of `cautious_adamw` relative to `optax.adamw` on a LLaMA-130M-shaped tree.

The param tree has the shapes of a 12-layer LLaMA with hidden 768,
intermediate 2048 and vocab 32000 (Flax ``(in, out)`` kernels, one leaf per
layer, ~134M float32 params). Each optimizer runs as one jitted
``update + apply_updates`` step with params and optimizer state donated, after
warm-up steps; the variants are timed interleaved (every round times each
variant in turn), and the script prints the median over rounds of each
variant's step time and of its ratio to `optax.adamw` measured in the same
round.

Usage::

    python scripts/bench_cautious.py [--rounds 10] [--steps 3] [--small]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import optim_transforms as ot
from optim_transforms.validate import finalize


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> dict:
    """Param shapes of a LLaMA, Flax ``(in, out)`` layout, one dict per layer."""
    layer = {
        "attn": {
            "q_proj": (hidden, hidden),
            "k_proj": (hidden, hidden),
            "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden),
        },
        "mlp": {
            "gate_proj": (hidden, intermediate),
            "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden),
        },
        "input_norm": (hidden,),
        "post_attn_norm": (hidden,),
    }
    return {
        "embed": (vocab, hidden),
        "layers": {f"{i}": layer for i in range(layers)},
        "final_norm": (hidden,),
        "lm_head": (hidden, vocab),
    }


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def make_tree(shapes: dict, seed: int, scale: float) -> dict:
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)]
    )


def make_step(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3, help="steps timed per variant per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a 2-layer, vocab-4096 tree (smoke test)")
    ap.add_argument("--all", action="store_true", help="also time the breakdown variants")
    args = ap.parse_args()

    if args.small:
        shapes = llama_shapes(hidden=256, intermediate=688, layers=2, vocab=4096)
    else:
        shapes = llama_shapes(hidden=768, intermediate=2048, layers=12, vocab=32000)
    grads = make_tree(shapes, seed=1, scale=1e-3)
    n_params = sum(x.size for x in jax.tree.leaves(grads))

    lr, wd = 1e-3, 1e-4
    variants = {
        "optax.adamw": optax.adamw(lr, weight_decay=wd),
        "cautious_adamw": ot.cautious_adamw(lr, weight_decay=wd),
    }
    if args.all:
        variants["adamw+skip_nonfinite"] = finalize(
            optax.adamw(lr, weight_decay=wd), skip_nonfinite=True
        )
        variants["cautious_adamw(skip_nonfinite=False)"] = ot.cautious_adamw(
            lr, weight_decay=wd, skip_nonfinite=False
        )

    runs = {}
    for name, tx in variants.items():
        params = make_tree(shapes, seed=0, scale=0.02)
        state = tx.init(params)
        step = make_step(tx)
        for _ in range(args.warmup):
            params, state = step(params, state, grads)
        jax.block_until_ready((params, state))
        runs[name] = [step, params, state]

    times = {name: [] for name in variants}
    ratios = {name: [] for name in variants}
    cpu_times = {name: [] for name in variants}
    for _ in range(args.rounds):
        this_round = {}
        for name, run in runs.items():
            step, params, state = run
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                params, state = step(params, state, grads)
            jax.block_until_ready((params, state))
            this_round[name] = (time.perf_counter() - t0) / args.steps
            cpu_times[name].append((time.process_time() - c0) / args.steps)
            run[1], run[2] = params, state
        for name, t in this_round.items():
            times[name].append(t)
            ratios[name].append(t / this_round["optax.adamw"])

    print(
        f"{n_params / 1e6:.1f}M float32 params, {len(jax.tree.leaves(grads))} leaves, "
        f"backend {jax.default_backend()}, {args.rounds} rounds x {args.steps} steps"
    )
    # Process CPU time (all threads) is less sensitive to other load on the machine.
    print(
        f"{'variant':40s} {'median ms/step':>15s} {'median ratio to adamw':>22s} "
        f"{'median CPU ms/step':>19s}"
    )
    for name in variants:
        print(
            f"{name:40s} {1e3 * statistics.median(times[name]):15.1f} "
            f"{statistics.median(ratios[name]):22.3f} "
            f"{1e3 * statistics.median(cpu_times[name]):19.1f}"
        )


if __name__ == "__main__":
    main()
