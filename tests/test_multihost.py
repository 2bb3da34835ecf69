"""A real 2-process run: two Python processes on loopback, 2 CPU devices each.

`jax.distributed.initialize` with gloo CPU collectives joins them into one
4-device global mesh ``(data=2, fsdp=2, tensor=1)``; ``llama-1m`` trains 5
AdamW steps on it, and the losses must equal those of a single-process run on
a 4-device mesh of the same shape.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from models import sharding as S
from models.llama import get_config
from models.train import make_train_step

STEPS = 5
BATCH, SEQ = 8, 32
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_multihost_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_training(steps: int, devices=None) -> list[float]:
    """Trains llama-1m on a (2, 2, 1) mesh; returns the loss of every step.

    Used by the worker processes (global devices) and by the single-process
    reference (``devices`` = 4 local devices).
    """
    mesh = S.make_mesh(2, 2, 1, devices=devices)
    cfg = get_config("llama-1m")
    model = S.create_model(cfg, mesh, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    ts = make_train_step(graphdef, optax.adamw(1e-3), mesh, params)
    state = ts.init_opt_state(params)
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    host = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    # Each process supplies the rows of the global batch its devices hold.
    batch = {
        k: jax.make_array_from_callback(v.shape, ts.batch_sharding, lambda idx, v=v: v[idx])
        for k, v in host.items()
    }
    key = jax.random.key(0)
    losses = []
    for _ in range(steps):
        params, state, metrics = ts.step(params, state, batch, key)
        losses.append(float(metrics["loss"]))
    return losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_matches_single_process():
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(port), str(i), str(STEPS)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=400)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    except subprocess.TimeoutExpired:
        pytest.fail("2-process run timed out")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [json.loads(o.strip().splitlines()[-1])["losses"] for o in outs]
    assert results[0] == results[1]
    ref = run_training(STEPS, devices=jax.devices()[:4])
    print(f"2 processes: {results[0]}\n1 process:   {ref}")
    np.testing.assert_allclose(results[0], ref, atol=1e-5, rtol=0)
    assert ref[-1] < ref[0]
