"""Amortized per-step time of Sophia-G / Sophia-H (update_every=10) vs AdamW on llama-1m.

Interleaved rounds in one process; per round each function runs R times; median over rounds.
"""

import statistics
import sys
import time

import jax
import optax
from flax import nnx

import optim_transforms as ot
from models.llama import get_config
from models.sharding import create_model, make_mesh
from models.train import make_train_step

B, T, K = int(sys.argv[1]) if len(sys.argv) > 1 else 16, 128, 10
cfg = get_config("llama-1m")
mesh = make_mesh(1, 1, 1)
model = create_model(cfg, mesh, seed=0)
graphdef, params0 = nnx.split(model, nnx.Param)
rng = jax.random.key(0)
toks = jax.random.randint(rng, (B, T + 1), 0, cfg.vocab_size)
batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
key = jax.random.key(1)


def setup(tx, hessian):
    ts = make_train_step(graphdef, tx, mesh, params0, hessian=hessian, donate=False)
    st = ts.init_opt_state(params0)
    fns = {"step": ts.step}
    if hessian:
        fns["refresh"] = ts.refresh_step
    for f in fns.values():  # compile + warm
        jax.block_until_ready(f(params0, st, batch, key))
    return fns, st


cases = {
    "adamw": setup(optax.adamw(1e-3), None),
    "sophia_g": setup(ot.sophia_g(1e-3), "gnb"),
    "sophia_h": setup(ot.sophia_h(1e-3), "hutchinson"),
}
R, ROUNDS = 5, 7
times = {}
for _ in range(ROUNDS):
    for name, (fns, st) in cases.items():
        for fname, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(R):
                out = f(params0, st, batch, key)
            jax.block_until_ready(out)
            times.setdefault((name, fname), []).append((time.perf_counter() - t0) / R)
med = {k: statistics.median(v) for k, v in times.items()}
for k, v in med.items():
    print(f"{k[0]:9s} {k[1]:8s} {v * 1e3:8.2f} ms")
a = med[("adamw", "step")]
for name in ("sophia_g", "sophia_h"):
    s, r = med[(name, "step")], med[(name, "refresh")]
    amort = ((K - 1) * s + r) / K
    print(f"{name}: step/adamw {s / a:.3f}  refresh/adamw {r / a:.3f}", end="  ")
    print(f"amortized(k={K})/adamw {amort / a:.3f}")
