"""Update speed: one jitted ``update`` + ``apply_updates`` per optimizer, side by side.

On the LLaMA-130M fp32 param tree, every registry optimizer (and optax
references: ``optax.contrib.muon`` with SWAN's Newton-Schulz matmul count,
``optax.contrib.sophia``, and a donated copy ``x * 1.0000001`` showing the
memory-bandwidth floor) runs as ``jax.jit(step, donate_argnums=(0, 1))`` on
the same params and gradients: compiled and warmed first, then timed
interleaved round-robin (the order rotates every round), median over rounds.
Ratios are to ``optax.adamw`` measured in the same rounds.

PyTorch references run in a second phase on the same shapes in PyTorch
``(out, in)`` layout with ``torch.set_num_threads(2)``, interleaved with
``optax.adamw`` again so that their ratios are same-run ratios too.

Run: ``python -m experiments.bench.speed [--rounds 10] [--model llama-130m]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optim_transforms
from experiments.bench import common

__all__ = [
    "APOLLO_MINI_ALL",
    "Candidate",
    "apollo_mini_all",
    "jax_candidates",
    "torch_candidates",
    "time_round_robin",
    "run",
]

LR = 1e-3
BASELINE = "adamw"


@dataclasses.dataclass
class Candidate:
    """A timed thing: ``setup()`` returns a zero-argument ``call`` that runs one step and blocks."""

    name: str
    setup: Callable[[], Callable[[], None]] | None
    note: str = ""
    status: str = "ok"
    state_bytes: int = 0  # what it keeps alive while set up (to pack groups in memory)


# ---------------------------------------------------------------- JAX side


def random_tree(tree: Any, seed: int, scale: float = 0.02) -> Any:
    """Concrete fp32 arrays with the shapes of ``tree`` (normal * scale)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    @jax.jit
    def make(keys):
        return [
            scale * jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ]

    return jax.tree.unflatten(treedef, make(keys))


class _Shared:
    """Params shared by all JAX candidates (each step donates them and returns new ones)."""

    def __init__(self, params: Any, grads: Any):
        self.params = params
        self.grads = grads


def _tx_candidate(
    name: str, tx: optax.GradientTransformation, shared: _Shared, note: str = "", **update_kw
):
    def setup():
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params, **update_kw)
            return optax.apply_updates(params, updates), state

        box = {"state": jax.jit(tx.init)(shared.params)}
        # Compiled ahead of time, so one warm-up call is a warm call.
        jstep = (
            jax.jit(step, donate_argnums=(0, 1))
            .lower(shared.params, box["state"], shared.grads)
            .compile()
        )

        def call():
            shared.params, box["state"] = jstep(shared.params, box["state"], shared.grads)
            jax.block_until_ready((shared.params, box["state"]))

        return call

    state = jax.eval_shape(tx.init, shared.params)
    return Candidate(name, setup, note, state_bytes=common.tree_bytes(state))


def _copy_candidate(shared: _Shared) -> Candidate:
    def setup():
        jcopy = (
            jax.jit(lambda p: jax.tree.map(lambda x: x * 1.0000001, p), donate_argnums=0)
            .lower(shared.params)
            .compile()
        )

        def call():
            shared.params = jcopy(shared.params)
            jax.block_until_ready(shared.params)

        return call

    return Candidate("copy x*1.0000001", setup, "donated; memory-bandwidth floor")


def _sophia_obj_fn_candidate(shared: _Shared) -> Candidate:
    obj = lambda p: sum(0.5 * jnp.sum(x * x) for x in jax.tree.leaves(p))
    return _tx_candidate(
        "optax.contrib.sophia",
        optax.contrib.sophia(LR),
        shared,
        "Hutchinson every 10 steps inside lax.cond; median = non-refresh steps",
        obj_fn=obj,
    )


def _muon_candidate(shared: _Shared, tree: Any) -> Candidate:
    ns = optim_transforms.hyperparameters("swan").get("ns_steps", 10)
    ns = ns if isinstance(ns, int) else 10
    labels = optim_transforms.matrix_labels(tree)
    dims = jax.tree.map(
        lambda lab, x: (
            optax.contrib.MuonDimensionNumbers(0, 1) if lab == "matrix" and x.ndim == 2 else None
        ),
        labels,
        tree,
    )
    tx = optax.contrib.muon(LR, ns_steps=ns, muon_weight_dimension_numbers=dims)
    return _tx_candidate(
        f"optax.contrib.muon (ns_steps={ns})",
        tx,
        shared,
        f"{3 * ns} NS matmuls per matrix, as SWAN's {ns} coupled iterations; same routing",
    )


APOLLO_MINI_ALL = "apollo_mini (embedding + LM head too)"


def apollo_mini_all(learning_rate: float = LR) -> common.Available:
    """APOLLO-Mini on every matrix, the embedding and LM head included.

    The registry's default (paper practice) routes those two to AdamW; on
    llama-130m they are 37% of the params, which bounds the default's ratio
    to ``optax.adamw`` from below. This row shows the ratio without them.
    """
    labels = lambda p: optim_transforms.matrix_labels(p, exclude=None)
    return common.try_build("apollo_mini", learning_rate, labels=labels)


def _built_candidate(
    name: str, avail: common.Available, shared: _Shared, note: str = ""
) -> Candidate:
    """A timed `_tx_candidate` of ``avail``, or an untimed row saying why it is unavailable."""
    if not avail.ok:
        return Candidate(name, None, status=avail.reason)
    return _tx_candidate(name, avail.tx, shared, note)


def jax_candidates(shared: _Shared, tree: Any) -> list[Candidate]:
    """``optax.adamw`` first, then every registry optimizer, then the optax references."""
    out = [_tx_candidate(BASELINE, optax.adamw(LR), shared, "optax.adamw (baseline)")]
    for name in common.optimizer_names():
        if name == BASELINE:
            continue
        note = "non-refresh steps (no hessian_diag)" if name.startswith("sophia") else ""
        out.append(_built_candidate(name, common.try_build(name, LR), shared, note))
    note = "labels=matrix_labels(p, exclude=None); the default gives them AdamW"
    out.append(_built_candidate(APOLLO_MINI_ALL, apollo_mini_all(), shared, note))
    out.append(_muon_candidate(shared, tree))
    out.append(_sophia_obj_fn_candidate(shared))
    out.append(_copy_candidate(shared))
    return out


# ---------------------------------------------------------------- PyTorch side


def _stub_module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules.setdefault(name, mod)
    return sys.modules[name]


def import_apollo_torch():
    """``apollo_torch.APOLLOAdamW``; bitsandbytes (never used by it) is stood in.

    The stand-ins are removed again once the import is done: left in
    ``sys.modules`` (without a ``__spec__``) they make a later
    ``importlib.util.find_spec("bitsandbytes")`` raise, as pytorch-optimizer's
    import does.
    """
    added: list[str] = []
    if "bitsandbytes" not in sys.modules and importlib.util.find_spec("bitsandbytes") is None:
        before = set(sys.modules)
        bnb = _stub_module("bitsandbytes")
        optim = _stub_module("bitsandbytes.optim")
        opt = _stub_module(
            "bitsandbytes.optim.optimizer", Optimizer2State=type("Optimizer2State", (), {})
        )
        func = _stub_module("bitsandbytes.functional")
        bnb.optim, bnb.functional, optim.optimizer = optim, func, opt
        added = [name for name in sys.modules if name not in before]
    try:
        from apollo_torch import APOLLOAdamW
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return APOLLOAdamW


def import_timm_optim():
    """``(AdamWLegacy, Lion)`` from timm without ``import timm`` (needs torchvision)."""
    if "timm" not in sys.modules:
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("timm is not installed")
        root = list(spec.submodule_search_locations)[0]
        _stub_module("timm", __path__=[root])
        _stub_module("timm.optim", __path__=[os.path.join(root, "optim")])
    from timm.optim.adamw import AdamWLegacy
    from timm.optim.lion import Lion

    return AdamWLegacy, Lion


def torch_layout(shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """Flax ``(in, out)`` Dense kernels become PyTorch ``(out, in)``; the rest keep their shape."""
    if len(shape) == 2 and not name.endswith("embedding"):
        return (shape[1], shape[0])
    return shape


def torch_candidates(tree: Any) -> list[Candidate]:
    """PyTorch references on the same shapes, ``(out, in)`` layout, 2 threads."""
    try:
        import torch
    except ImportError as e:
        return [Candidate("torch", None, status=f"not available ({e})")]
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    flat = jax.tree_util.tree_leaves_with_path(tree)
    labels = jax.tree.leaves(optim_transforms.matrix_labels(tree))
    params, matrices, others = [], [], []
    for (path, x), lab in zip(flat, labels, strict=True):
        shape = torch_layout(tuple(x.shape), common.slug(path))
        p = torch.nn.Parameter(0.02 * torch.randn(shape, generator=gen))
        p.grad = 0.02 * torch.randn(shape, generator=gen)
        params.append(p)
        (matrices if lab == "matrix" else others).append(p)

    pbytes = common.tree_bytes(tree)

    def opt_candidate(name, make, note="", state_ratio=2.0):
        def setup():
            opt = make()
            # PyTorch creates optimizer state in the first step; take it here, so that
            # the warm-up call (a sample when it is slow) is a steady-state step.
            opt.step()

            def call():
                opt.step()

            return call

        return Candidate(name, setup, note, state_bytes=int(state_ratio * pbytes))

    out = [
        opt_candidate("torch AdamW foreach", lambda: torch.optim.AdamW(params, LR, foreach=True)),
        opt_candidate("torch AdamW fused", lambda: torch.optim.AdamW(params, LR, fused=True)),
    ]
    try:
        from came_pytorch import CAME

        out.append(opt_candidate("came-pytorch CAME", lambda: CAME(params, lr=LR), state_ratio=1))
    except ImportError as e:
        out.append(Candidate("came-pytorch CAME", None, status=f"not available ({e})"))
    try:
        apollo_cls = import_apollo_torch()

        def apollo(rank, scale_type, scale):
            group = {
                "params": matrices,
                "rank": rank,
                "proj": "random",
                "scale_type": scale_type,
                "scale": scale,
                "update_proj_gap": 200,
                "proj_type": "std",
            }
            return lambda: apollo_cls([group, {"params": others}], lr=LR)

        out.append(
            opt_candidate(
                "apollo-torch APOLLO (r=256, channel)", apollo(256, "channel", 1.0), state_ratio=1
            )
        )
        out.append(
            opt_candidate(
                "apollo-torch APOLLO-Mini (r=1, tensor)", apollo(1, "tensor", 128.0), state_ratio=1
            )
        )
    except Exception as e:
        out.append(Candidate("apollo-torch", None, status=f"not available ({e})"))
    try:
        adamw_legacy, lion = import_timm_optim()
        out.append(
            opt_candidate(
                "timm AdamWLegacy caution=True", lambda: adamw_legacy(params, LR, caution=True)
            )
        )
        out.append(
            opt_candidate(
                "timm Lion caution=True", lambda: lion(params, LR, caution=True), state_ratio=1
            )
        )
    except Exception as e:
        out.append(Candidate("timm", None, status=f"not available ({e})"))
    return out


# ---------------------------------------------------------------- timing


def time_round_robin(
    cands: list[Candidate],
    rounds: int,
    *,
    warmup: int = 1,
    slow_s: float = float("inf"),
    slow_rounds: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, dict[str, Any]]:
    """Times each ready candidate ``rounds`` times, interleaved round-robin.

    Every candidate is set up (compiled) and called ``warmup`` times first.
    Round ``r`` visits the candidates starting at index ``r`` (rotation), so no
    candidate always runs right after the same neighbour. A candidate whose
    warm call takes longer than ``slow_s`` seconds is timed in only
    ``slow_rounds`` rounds (stated in the output), its warm-up call counting
    as the first (the step is compiled before it, so such a call is a
    steady-state sample).

    Returns:
      ``{name: {"times": [s, ...], "median": s, "rounds": n, "status": ...}}``.
    """
    res: dict[str, dict[str, Any]] = {}
    calls: dict[str, Callable[[], None]] = {}
    budget: dict[str, int] = {}
    for c in cands:
        res[c.name] = {"times": [], "median": None, "rounds": 0, "status": c.status, "note": c.note}
        if c.setup is None:
            continue
        try:
            t0 = time.perf_counter()
            call = c.setup()
            for _ in range(max(warmup, 1)):
                t1 = time.perf_counter()
                call()
                warm = time.perf_counter() - t1
        except Exception as e:  # a broken optimizer is reported, not fatal
            res[c.name]["status"] = f"failed ({type(e).__name__}: {str(e)[:200]})"
            continue
        log(
            f"  ready {c.name}: setup+warmup {time.perf_counter() - t0:.1f}s, warm call {warm:.3f}s"
        )
        calls[c.name] = call
        budget[c.name] = rounds if warm <= slow_s else min(rounds, slow_rounds or rounds)
        if warm > slow_s:
            # Compiled before this call: a call this slow is a steady-state sample.
            res[c.name]["times"].append(warm)
    names = list(calls)
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            if len(res[name]["times"]) >= budget[name]:
                continue
            t0 = time.perf_counter()
            calls[name]()
            res[name]["times"].append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{rounds} done")
    for name in names:
        t = res[name]["times"]
        res[name]["rounds"] = len(t)
        res[name]["median"] = statistics.median(t)
    return res


def pack_groups(cands: list[Candidate], budget_bytes: int) -> list[list[Candidate]]:
    """Splits ``cands`` (in order) into groups whose state fits in ``budget_bytes`` together.

    Unavailable candidates cost nothing; a candidate larger than the budget
    gets a group of its own.
    """
    groups: list[list[Candidate]] = [[]]
    used = 0
    for c in cands:
        cost = c.state_bytes if c.setup is not None else 0
        if groups[-1] and used + cost > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(c)
        used += cost
    return groups


def _grouped(
    anchors: Callable[[], list[Candidate]],
    cands: list[Candidate],
    rounds: int,
    budget_bytes: int,
    log: Callable[[str], None],
    **kw: Any,
) -> dict[str, dict[str, Any]]:
    """Times each memory-bounded group together with fresh ``anchors()``; ratios per group."""
    out: dict[str, dict[str, Any]] = {}
    groups = pack_groups(cands, budget_bytes)
    for i, group in enumerate(groups):
        log(f"  group {i + 1}/{len(groups)}: {', '.join(c.name for c in group)}")
        anchor = anchors()
        res = time_round_robin([*anchor, *group], rounds, log=log, **kw)
        medians = {a.name: res[a.name]["median"] for a in anchor}
        for a in anchor:
            out.setdefault(a.name, {**res[a.name], "groups": []})["groups"].append(res[a.name])
        for c in group:
            r = res[c.name]
            r["group"] = i + 1
            r["anchor_medians"] = medians
            out[c.name] = r
    for a_name, a in out.items():
        if "groups" in a:  # the anchor row: median over all its rounds in every group
            times = [t for g in a["groups"] for t in g["times"]]
            a["times"], a["rounds"] = times, len(times)
            a["median"] = statistics.median(times) if times else None
            a["anchor_medians"] = {a_name: a["median"]}
    return out


def run(
    model: str = "llama-130m",
    rounds: int = 10,
    *,
    slow_s: float = 2.0,
    slow_rounds: int = 10,
    torch_refs: bool = True,
    tree: Any = None,
    state_budget_gib: float = 2.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """JAX phase, then PyTorch phase; returns timings and ratios (see module doc).

    To bound memory, the candidates are timed in groups whose optimizer states
    total at most ``state_budget_gib``; every group is timed round-robin with
    its own ``optax.adamw`` anchor (and, for PyTorch, ``torch AdamW foreach``),
    and each ratio is to the anchor of its own group.
    """
    tree = common.abstract_tree(model) if tree is None else tree
    tree = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), tree)
    out: dict[str, Any] = {"model": model, "rounds": rounds, "tree_source": common.tree_source()}
    out["param_bytes"] = common.tree_bytes(tree)
    budget = int(state_budget_gib * 2**30)
    kw = {"slow_s": slow_s, "slow_rounds": slow_rounds}

    log(f"speed: JAX phase on {model} ({out['param_bytes'] / 2**20:.0f} MiB of params)")
    shared = _Shared(random_tree(tree, 0), random_tree(tree, 1))
    cands = jax_candidates(shared, tree)
    anchor = lambda: [_tx_candidate(BASELINE, optax.adamw(LR), shared, "optax.adamw (baseline)")]
    jres = _grouped(anchor, [c for c in cands if c.name != BASELINE], rounds, budget, log, **kw)
    for r in jres.values():
        base = (r.get("anchor_medians") or {}).get(BASELINE)
        r["ratio"] = None if r["median"] is None or not base else r["median"] / base
    out["jax"] = {BASELINE: jres.pop(BASELINE), **jres}
    del shared, cands

    if torch_refs:
        log("speed: PyTorch phase (torch.set_num_threads(2))")
        shared = _Shared(random_tree(tree, 0), random_tree(tree, 1))
        tcands = torch_candidates(tree)
        by_name = {c.name: c for c in tcands}
        torch_base = "torch AdamW foreach"

        def anchors():
            a = [_tx_candidate(BASELINE, optax.adamw(LR), shared, "optax.adamw (anchor)")]
            if torch_base in by_name:
                a.append(by_name[torch_base])
            return a

        rest = [c for c in tcands if c.name != torch_base]
        tres = _grouped(anchors, rest, rounds, budget, log, **kw)
        for r in tres.values():
            med = r.get("anchor_medians") or {}
            ok = r["median"] is not None
            r["ratio"] = r["median"] / med[BASELINE] if ok and med.get(BASELINE) else None
            r["ratio_torch"] = r["median"] / med[torch_base] if ok and med.get(torch_base) else None
        if torch_base in tres and BASELINE in tres:
            t, a = tres[torch_base], tres[BASELINE]
            t["ratio"] = t["median"] / a["median"] if t["median"] and a["median"] else None
            t["ratio_torch"] = 1.0 if t["median"] else None
        tres[BASELINE]["ratio"] = 1.0
        tres[BASELINE]["ratio_torch"] = (
            a["median"] / t["median"] if torch_base in tres and t["median"] else None
        )
        order = [BASELINE, torch_base, *(c.name for c in rest)]
        out["torch"] = {n: tres[n] for n in order if n in tres}
        del shared
    return out


def _ms(s: float | None) -> str:
    return "—" if s is None else f"{1e3 * s:.1f}"


def _x(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def to_markdown(res: dict[str, Any], targets: dict[str, str] | None = None) -> str:
    targets = targets or {}
    lines = [
        f"{res['model']} fp32 tree ({res['param_bytes'] / 2**20:.0f} MiB of params; "
        f"{res['tree_source']}). One jitted `update` + `apply_updates`, params and state "
        "donated, compiled ahead and warmed, interleaved round-robin (rotating order); "
        "median over the rounds shown. Candidates are timed in memory-bounded groups, each "
        "with its own `optax.adamw` anchor: ratio = median / median of the anchor in the "
        "same group (the adamw row pools all groups).",
        "",
        "| optimizer | median ms | rounds | ratio to optax.adamw | target | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in res["jax"].items():
        if r["median"] is None:
            lines.append(f"| {name} | {r['status']} | | | {targets.get(name, '')} | |")
            continue
        lines.append(
            f"| {name} | {_ms(r['median'])} | {r['rounds']} | {_x(r['ratio'])} | "
            f"{targets.get(name, '')} | {r['note']} |"
        )
    if "torch" in res:
        lines += [
            "",
            "PyTorch references (same shapes, `(out, in)` layout, `torch.set_num_threads(2)`), "
            "timed round-robin in memory-bounded groups, each with its own `optax.adamw` and "
            "`torch AdamW foreach` anchors (ratios are to the anchors of the same group):",
            "",
            "| optimizer | median ms | rounds | ratio to optax.adamw "
            "| ratio to torch AdamW foreach |",
            "|---|---|---|---|---|",
        ]
        for name, r in res["torch"].items():
            if r["median"] is None:
                lines.append(f"| {name} | {r['status']} | | | |")
                continue
            lines.append(
                f"| {name} | {_ms(r['median'])} | {r['rounds']} | {_x(r['ratio'])} | "
                f"{_x(r['ratio_torch'])} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-130m")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--slow-rounds", type=int, default=10)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.model, args.rounds, slow_rounds=args.slow_rounds, torch_refs=not args.no_torch)
    print(to_markdown(res))


if __name__ == "__main__":
    main()
