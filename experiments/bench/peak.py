"""Compiled peak memory of the full train step, every optimizer, as a ratio to AdamW.

For each registry optimizer, `models.train.make_train_step` builds the
jitted step (forward, backward, ``tx.update``, ``apply_updates``; params and
state donated) for a fixed LLaMA config and batch on a 1-device mesh, and
``.lower(...).compile().memory_analysis()`` reports its buffers. Nothing is
run and no model-sized array is allocated (the step is lowered on
`jax.ShapeDtypeStruct`s). Sophia-G/H also report their refresh step (with
the Hessian-diagonal estimate).

Run: ``python -m experiments.bench.peak [--model llama-130m --batch 8 --seq 256]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from experiments.bench import common

__all__ = ["HESSIAN", "compiled_memory", "run", "to_markdown"]

HESSIAN = {"sophia_h": "hutchinson", "sophia_g": "gnb"}
FIELDS = (
    "peak_memory_in_bytes",
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
)


def _abstract_model(model: str):
    from flax import nnx

    from models.llama import Llama, get_config
    from models.sharding import LOGICAL_AXIS_RULES, make_mesh, param_shardings

    config = get_config(model)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    shardings = param_shardings(state, mesh)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    return graphdef, params, mesh


def compiled_memory(
    model: str, tx: optax.GradientTransformation, batch: int, seq: int, *, hessian=None
) -> dict[str, dict[str, int]]:
    """``{"step": {field: bytes}, ["refresh": ...]}`` of the compiled train step(s)."""
    from models.train import make_train_step

    graphdef, params, mesh = _abstract_model(model)
    ts = make_train_step(graphdef, tx, mesh, params, hessian=hessian)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(optax.with_extra_args_support(tx).init, params),
        ts.state_shardings,
    )
    tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=ts.batch_sharding)
    data = {"inputs": tok, "targets": tok}
    key = jax.random.key(0)
    out = {}
    for kind in ("step", "refresh") if hessian else ("step",):
        ma = ts.compiled_memory(params, state, data, key, refresh=kind == "refresh")
        m = {f: int(getattr(ma, f, 0) or 0) for f in FIELDS}
        # Upper bound of live bytes: XLA:CPU's peak_memory_in_bytes leaves out temporaries.
        m["live_bytes"] = (
            m["argument_size_in_bytes"]
            + m["output_size_in_bytes"]
            - m["alias_size_in_bytes"]
            + m["temp_size_in_bytes"]
        )
        out[kind] = m
    return out


def run(
    model: str = "llama-130m",
    batch: int = 8,
    seq: int = 256,
    *,
    names: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compiled memory of every optimizer's train step (see module doc)."""
    res: dict[str, Any] = {"model": model, "batch": batch, "seq": seq, "rows": {}}
    names = names or common.optimizer_names()
    for name in names:
        avail = common.try_build(name)
        if not avail.ok:
            res["rows"][name] = {"status": avail.reason}
            continue
        t0 = time.perf_counter()
        try:
            mem = compiled_memory(model, avail.tx, batch, seq, hessian=HESSIAN.get(name))
        except Exception as e:  # reported in the table, never hidden
            res["rows"][name] = {"status": f"failed ({type(e).__name__}: {str(e)[:200]})"}
            continue
        log(f"  peak {name}: compiled in {time.perf_counter() - t0:.1f}s")
        res["rows"][name] = {"status": "ok", **mem}
    base = res["rows"].get("adamw", {}).get("step", {})
    for r in res["rows"].values():
        for kind in ("step", "refresh"):
            if kind in r and base:
                m = r[kind]
                m["ratio"] = m["peak_memory_in_bytes"] / base["peak_memory_in_bytes"]
                m["live_ratio"] = m["live_bytes"] / base["live_bytes"]
    return res


def to_markdown(res: dict[str, Any]) -> str:
    lines = [
        f"{res['model']}, batch {res['batch']} x {res['seq']} tokens, fp32, 1 device; "
        "`make_train_step(...)` lowered on abstract arrays, "
        "`.compile().memory_analysis()` (per device). `peak` is XLA's "
        "`peak_memory_in_bytes`; `live` = arguments + outputs - aliased (donated) + "
        "temporaries. Ratios are to adamw's.",
        "",
        "| optimizer | step | peak | peak / adamw | live | live / adamw | arguments "
        "| temporaries |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | | {r['status']} | | | | | |")
            continue
        for kind in ("step", "refresh"):
            if kind not in r:
                continue
            m = r[kind]
            ratio = f"{m['ratio']:.3f}" if "ratio" in m else "—"
            live = f"{m['live_ratio']:.3f}" if "live_ratio" in m else "—"
            lines.append(
                f"| {name} | {kind} | {common.fmt_bytes(m['peak_memory_in_bytes'])} | {ratio} | "
                f"{common.fmt_bytes(m['live_bytes'])} | {live} | "
                f"{common.fmt_bytes(m['argument_size_in_bytes'])} | "
                f"{common.fmt_bytes(m['temp_size_in_bytes'])} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-130m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--opts", default=None, help="comma-separated (default: all)")
    args = ap.parse_args(argv)
    names = args.opts.split(",") if args.opts else None
    print(to_markdown(run(args.model, args.batch, args.seq, names=names)))


if __name__ == "__main__":
    main()
