"""Whitening update time: Newton-Schulz vs SVD vs `optax.adamw`, on the same matrix.

For each matrix shape (Flax ``(in, out)`` leaf, float32 gradient) the script
times one jitted ``update`` of

* ``whiten_ns``: `optim_transforms.whiten` (Newton-Schulz, ``ns_steps`` steps);
* ``whiten_svd``: `optim_transforms.whiten(method="svd")`;
* ``swan``: the whole `optim_transforms.swan` update (grad_norm + whiten + lr);
* ``adamw``: `optax.adamw` (the baseline of every ratio),

after compilation and warm-up. The variants are timed interleaved (each round
times every variant in turn) and the script prints, per variant, the median
over rounds of its update time and of its ratio to adamw in the same round.

Usage::

    python scripts/bench_whiten.py [--rounds 5] [--shapes 1024x1024 4096x1024] [--ns-steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import optim_transforms as ot


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def bench_shape(shape: tuple[int, int], rounds: int, warmup: int, ns_steps: int) -> dict:
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": 0.02 * jax.random.normal(k1, shape, jnp.float32)}
    grads = {"w": jax.random.normal(k2, shape, jnp.float32)}
    txs = {
        "whiten_ns": ot.whiten(ns_steps=ns_steps),
        "whiten_svd": ot.whiten(method="svd"),
        "swan": ot.swan(1e-3, ns_steps=ns_steps, labels={"w": "matrix"}),
        "adamw": optax.adamw(1e-3),
    }
    steps, states = {}, {}
    for name, tx in txs.items():
        steps[name] = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
        states[name] = tx.init(params)
        for _ in range(warmup):
            out = jax.block_until_ready(steps[name](grads, states[name], params))
            states[name] = out[1]
    times = {name: [] for name in txs}
    for _ in range(rounds):
        for name in txs:
            times[name].append(_timed(steps[name], grads, states[name], params))
    ratios = {
        name: statistics.median(t / a for t, a in zip(ts, times["adamw"]))
        for name, ts in times.items()
    }
    return {name: (statistics.median(ts), ratios[name]) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ns-steps", type=int, default=10)
    ap.add_argument("--shapes", nargs="+", default=["1024x1024", "4096x1024"])
    args = ap.parse_args()
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    print(f"ns_steps={args.ns_steps}, rounds={args.rounds}; median time and median ratio to adamw")
    print(f"{'shape (in, out)':>16} {'variant':>11} {'ms':>10} {'x adamw':>9}")
    for s in args.shapes:
        shape = tuple(int(d) for d in s.split("x"))
        for name, (t, r) in bench_shape(shape, args.rounds, args.warmup, args.ns_steps).items():
            print(f"{s:>16} {name:>11} {1e3 * t:>10.2f} {r:>9.2f}")


if __name__ == "__main__":
    main()
