"""Will it fit? Per-device bytes of params, grads and optimizer state, before launching.

Uses the single sharding table of `models.sharding` (``LOGICAL_AXIS_RULES``)
for the params and `optim_transforms.sharding.state_shardings` for the
optimizer state, on a `jax.sharding.AbstractMesh` of the requested shape, so
a 512-chip mesh can be planned on a laptop: nothing is allocated and no
device of that mesh needs to exist.

    python -m experiments.bench.planner --model llama-7b \
        --mesh data,fsdp,tensor=1,16,1 --opt apollo_mini

Activations and temporaries are not included (see the compiled peak memory
benchmark, `experiments.bench.peak`, for those on a fixed batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding

import optim_transforms
from experiments.bench import common
from optim_transforms.sharding import state_shardings

__all__ = ["LeafPlan", "Plan", "parse_mesh", "abstract_sharded_params", "plan", "format_plan"]


@dataclasses.dataclass
class LeafPlan:
    kind: str  # "param", "grad" or "state"
    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: str
    global_bytes: int
    device_bytes: int


@dataclasses.dataclass
class Plan:
    model: str
    mesh: dict[str, int]
    opt: str
    leaves: list[LeafPlan]

    def total(self, kind: str, *, per_device: bool = True) -> int:
        key = "device_bytes" if per_device else "global_bytes"
        return sum(getattr(x, key) for x in self.leaves if x.kind == kind)


def parse_mesh(text: str) -> dict[str, int]:
    """``"data,fsdp,tensor=1,16,1"`` -> ``{"data": 1, "fsdp": 16, "tensor": 1}``."""
    try:
        names, sizes = text.split("=")
        names = [n.strip() for n in names.split(",")]
        sizes = [int(s) for s in sizes.split(",")]
    except ValueError as e:
        raise ValueError(f"--mesh {text!r}: expected e.g. 'data,fsdp,tensor=1,16,1'") from e
    from models.sharding import MESH_AXES

    if len(names) != len(sizes) or set(names) - set(MESH_AXES) or min(sizes) < 1:
        raise ValueError(f"--mesh {text!r}: axes must be among {MESH_AXES}, sizes >= 1")
    mesh = dict.fromkeys(MESH_AXES, 1)
    mesh.update(zip(names, sizes, strict=True))
    return mesh


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    from models.sharding import MESH_AXES

    return AbstractMesh(
        tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 3
    )


def abstract_sharded_params(model: str, mesh: AbstractMesh, **overrides: Any) -> tuple[Any, Any]:
    """``(params, shardings)``: the model's param tree as ShapeDtypeStructs and their shardings.

    The logical axis names come from the model built abstractly on one device;
    `models.sharding.param_shardings` resolves them for ``mesh``.
    """
    from flax import nnx

    from models.llama import Llama, get_config
    from models.sharding import LOGICAL_AXIS_RULES, make_mesh, param_shardings

    config = get_config(model, **overrides)
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(one), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract, nnx.Param)
    shardings = nnx.to_pure_dict(param_shardings(state, mesh))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    return params, shardings


def _leaf(kind, path, x, sharding: NamedSharding) -> LeafPlan:
    item = np.dtype(x.dtype).itemsize
    return LeafPlan(
        kind=kind,
        path=common.slug(path),
        shape=tuple(x.shape),
        dtype=str(np.dtype(x.dtype)),
        spec=str(tuple(sharding.spec)),
        global_bytes=math.prod(x.shape) * item,
        device_bytes=math.prod(sharding.shard_shape(tuple(x.shape))) * item,
    )


def plan(
    model: str,
    mesh: dict[str, int],
    opt: str,
    *,
    param_dtype: str | None = None,
    **hparams: Any,
) -> Plan:
    """Per-leaf global and per-device bytes of params, grads and state of ``opt``.

    Raises:
      ValueError: unknown model/optimizer, or an optimizer not implemented yet.
    """
    amesh = abstract_mesh(mesh)
    overrides = {"param_dtype": param_dtype} if param_dtype else {}
    params, pshard = abstract_sharded_params(model, amesh, **overrides)
    avail = common.try_build(opt, hparams.pop("learning_rate", 1e-3), **hparams)
    if not avail.ok:
        raise ValueError(f"optimizer {opt!r}: {avail.reason}")
    sshard = state_shardings(avail.tx, params, pshard, amesh)
    state = jax.eval_shape(avail.tx.init, params)
    leaves: list[LeafPlan] = []
    for kind in ("param", "grad"):
        for (path, x), s in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(pshard), strict=True
        ):
            leaves.append(_leaf(kind, path, x, s))
    for (path, x), s in zip(
        jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(sshard), strict=True
    ):
        leaves.append(_leaf("state", path, x, s))
    return Plan(model, dict(mesh), opt, leaves)


def format_plan(p: Plan, *, top: int = 8, device_memory_gib: float | None = None) -> str:
    n = math.prod(p.mesh.values())
    mesh = ", ".join(f"{k}={v}" for k, v in p.mesh.items())
    out = [f"{p.model} with {p.opt} on a ({mesh}) mesh ({n} devices); no allocation", ""]
    out.append(f"{'':<16}{'per device':>14}{'global':>14}")
    for kind in ("param", "grad", "state"):
        out.append(
            f"{kind + 's':<16}{common.fmt_bytes(p.total(kind)):>14}"
            f"{common.fmt_bytes(p.total(kind, per_device=False)):>14}"
        )
    tot = sum(p.total(k) for k in ("param", "grad", "state"))
    glob = sum(p.total(k, per_device=False) for k in ("param", "grad", "state"))
    out.append(f"{'total':<16}{common.fmt_bytes(tot):>14}{common.fmt_bytes(glob):>14}")
    if device_memory_gib is not None:
        verdict = "fits" if tot <= device_memory_gib * 2**30 else "does NOT fit"
        out.append(
            f"\n{verdict} in {device_memory_gib:g} GiB per device before activations "
            f"({100 * tot / (device_memory_gib * 2**30):.0f}% used)"
        )
    big = sorted((x for x in p.leaves if x.kind == "state"), key=lambda x: -x.device_bytes)
    if big:
        out += ["", f"largest optimizer-state leaves per device (top {top}):"]
        for x in big[:top]:
            out.append(
                f"  {common.fmt_bytes(x.device_bytes):>11}  {x.path} {x.shape} {x.dtype} {x.spec}"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--mesh", default="data,fsdp,tensor=1,1,1")
    ap.add_argument("--opt", default="adamw", help=f"one of {', '.join(common.optimizer_names())}")
    ap.add_argument("--param-dtype", default=None, help="e.g. bfloat16 (default: the config's)")
    ap.add_argument("--device-memory-gib", type=float, default=None)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args(argv)
    if args.opt not in optim_transforms.names():
        ap.error(f"--opt {args.opt!r}: valid names: {', '.join(optim_transforms.names())}")
    try:
        p = plan(args.model, parse_mesh(args.mesh), args.opt, param_dtype=args.param_dtype)
    except ValueError as e:
        ap.error(str(e))
    print(format_plan(p, top=args.top, device_memory_gib=args.device_memory_gib))


if __name__ == "__main__":
    main()
