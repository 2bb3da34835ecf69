"""Small convergence comparison: C-AdamW vs AdamW (and C-Lion vs Lion), 3 seeds.

Task: regression onto a random teacher MLP (16 -> 64 -> 64 -> 1, tanh) with a
student MLP of the same shape, Flax ``(in, out)`` kernels, 2048 training and
1024 held-out points, mini-batches of 128 drawn with the seed, plain MSE. Each
pair runs the same learning rate, data, init and batch order; the script
prints the held-out MSE after ``--steps`` steps per seed and the mean over
seeds.

Usage::

    python scripts/convergence_cautious.py [--steps 1000] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import optax

import optim_transforms as ot

SIZES = (16, 64, 64, 1)


def init_mlp(key, sizes=SIZES, scale=1.0):
    params = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:])):
        params.append(
            {
                "kernel": scale * jax.random.normal(k, (n_in, n_out)) / jnp.sqrt(n_in),
                "bias": jnp.zeros((n_out,)),
            }
        )
    return params


def mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return x @ params[-1]["kernel"] + params[-1]["bias"]


def make_data(seed, n_train=2048, n_test=1024):
    k_teacher, k_x, k_noise = jax.random.split(jax.random.key(10_000 + seed), 3)
    teacher = init_mlp(k_teacher, scale=2.0)
    x = jax.random.normal(k_x, (n_train + n_test, SIZES[0]))
    y = mlp(teacher, x) + 0.01 * jax.random.normal(k_noise, (n_train + n_test, 1))
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def mse(params, x, y):
    return jnp.mean((mlp(params, x) - y) ** 2)


def train(tx, seed, steps, batch=128):
    (x, y), (xt, yt) = make_data(seed)
    params = init_mlp(jax.random.key(seed))
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        idx = jax.random.randint(key, (batch,), 0, x.shape[0])
        grads = jax.grad(mse)(params, x[idx], y[idx])
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    keys = jax.random.split(jax.random.key(20_000 + seed), steps)
    for i in range(steps):
        params, state = step(params, state, keys[i])
    return float(mse(params, xt, yt))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()

    pairs = {
        "adamw lr=3e-3 wd=1e-4": lambda: optax.adamw(3e-3, weight_decay=1e-4),
        "cautious_adamw lr=3e-3 wd=1e-4": lambda: ot.cautious_adamw(3e-3, weight_decay=1e-4),
        "lion lr=3e-4 b=(.95,.98) wd=1e-3": lambda: optax.lion(
            3e-4, b1=0.95, b2=0.98, weight_decay=1e-3
        ),
        "cautious_lion lr=3e-4 wd=1e-3": lambda: ot.cautious_lion(3e-4, weight_decay=1e-3),
    }
    print(f"teacher-student MLP {SIZES}, {args.steps} steps, batch 128; held-out MSE")
    header = " ".join(f"seed {s:>3d}" for s in args.seeds)
    print(f"{'optimizer':34s} {header}      mean")
    for name, make in pairs.items():
        losses = [train(make(), seed, args.steps) for seed in args.seeds]
        row = " ".join(f"{v:8.5f}" for v in losses)
        print(f"{name:34s} {row}  {statistics.mean(losses):8.5f}")


if __name__ == "__main__":
    main()
