"""Optimizer-state memory: bytes of state / bytes of params, from `jax.eval_shape`.

For every registry optimizer and the LLaMA paper sizes (60M ... 7B), the state
tree of ``tx.init(params)`` is traced with `jax.eval_shape` (nothing is
allocated) and its bytes are summed. Next to it, the formula of ALGORITHMS.md
§6 evaluated on the same tree (matrix routing from
`optim_transforms.matrix_labels`), and what the papers claim.

Run: ``python -m experiments.bench.memory [--models llama-60m,llama-7b]``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import jax

import optim_transforms
from experiments.bench import common

__all__ = ["formula_floats", "measure", "run", "to_markdown", "CLAIMS"]

# What the papers (seeds) and ALGORITHMS.md say about optimizer-state memory.
CLAIMS = {
    "adamw": "2 floats per param (m, v)",
    "swan": "SWAN abstract: no accumulative state (SGD memory); ~50% less end-to-end "
    "memory than Adam. Matrices 0 floats, the rest AdamW",
    "apollo": "APOLLO abstract: nearly eliminates AdamW's states; "
    "2r*max(m,n) + r*min(m,n) + 1 per matrix (§3.2)",
    "apollo_mini": "APOLLO abstract: SGD-level memory; LLaMA-7B pre-training on one GPU "
    "in < 12 GB with weight quantization",
    "came": "CAME: mn + 2(m+n) per matrix vs Adam's 2mn (§5.1)",
    "sophia_g": "Sophia: memory equals AdamW's (m, h) (§2.1)",
    "sophia_h": "Sophia: memory equals AdamW's (m, h) (§2.1)",
    "cautious_adamw": "Cautious: no state beyond the base optimizer (AdamW)",
    "cautious_lion": "Cautious: no state beyond the base optimizer (Lion, 1 float)",
}


def _hparam(name: str, key: str, fallback: Any) -> Any:
    try:
        v = optim_transforms.hyperparameters(name).get(key, fallback)
    except ValueError:
        return fallback
    return fallback if v is None or isinstance(v, type) else v


def _adafactor_floats(shape: tuple[int, ...], min_dim: int = 128) -> int:
    # optax.scale_by_factored_rms: factor the two largest axes when the
    # smaller of them is >= min_dim_size_to_factor.
    if len(shape) < 2:
        return math.prod(shape)
    order = sorted(range(len(shape)), key=lambda i: shape[i])
    if shape[order[-2]] < min_dim:
        return math.prod(shape)
    n = math.prod(shape)
    return n // shape[order[-1]] + n // shape[order[-2]]


def formula_floats(name: str, tree: Any) -> int | None:
    """State floats of optimizer ``name`` on ``tree`` by ALGORITHMS.md §6 (None if no formula).

    Counters, keys and other scalars are left out (the measured number has them).
    """
    labels = optim_transforms.matrix_labels(tree)
    dims = optim_transforms.matrix.matrix_dims_tree(tree)
    rank = {"apollo": _hparam("apollo", "rank", 256), "apollo_mini": 1}.get(name)
    total = 0
    for x, label, d in zip(
        jax.tree.leaves(tree),
        jax.tree.leaves(labels),
        jax.tree.leaves(dims, is_leaf=lambda v: v is None or isinstance(v, tuple)),
        strict=True,
    ):
        shape = tuple(x.shape)
        n_el = math.prod(shape)
        if name in ("adamw", "cautious_adamw", "sophia_g", "sophia_h"):
            total += 2 * n_el
        elif name in ("lion", "cautious_lion"):
            total += n_el
        elif name == "sgd":
            total += 0
        elif name == "adafactor":
            total += _adafactor_floats(shape)
        elif name == "came":
            if len(shape) >= 2:
                b = math.prod(shape[:-2])
                m, n = shape[-2], shape[-1]
                total += b * (m * n + 2 * (m + n))
            else:
                total += 2 * n_el
        elif name in ("swan", "apollo", "apollo_mini"):
            if label != "matrix":
                total += 2 * n_el
            elif name != "swan":
                m = math.prod(shape[a] for a in d.output_axes)
                n = math.prod(shape[a] for a in d.reduction_axes)
                b = n_el // (m * n)
                total += b * (2 * rank * max(m, n) + rank * min(m, n) + 1)
        else:
            return None
    return total


def measure(name: str, tree: Any) -> dict[str, Any]:
    """One row: measured state bytes (eval_shape) and the formula, or why not available."""
    avail = common.try_build(name)
    pbytes = common.tree_bytes(tree)
    f = formula_floats(name, tree)
    row = {
        "optimizer": name,
        "param_bytes": pbytes,
        "formula_bytes": None if f is None else 4 * f,
        "state_bytes": None,
        "status": "ok",
    }
    if not avail.ok:
        row["status"] = avail.reason
        return row
    try:
        state = jax.eval_shape(avail.tx.init, tree)
    except Exception as e:  # reported in the table, never hidden
        row["status"] = f"init failed ({type(e).__name__}: {e})"
        return row
    row["state_bytes"] = common.tree_bytes(state)
    return row


def run(models: tuple[str, ...] = common.MODEL_SIZES) -> dict[str, Any]:
    """Measures every registry optimizer on every model in ``models``."""
    out: dict[str, Any] = {"source": common.tree_source(), "models": list(models), "rows": {}}
    for model in models:
        tree = common.abstract_tree(model)
        out["rows"][model] = [measure(n, tree) for n in common.optimizer_names()]
        out.setdefault("param_bytes", {})[model] = common.tree_bytes(tree)
        out.setdefault("param_count", {})[model] = sum(
            math.prod(x.shape) for x in jax.tree.leaves(tree)
        )
    return out


def _ratio(x: int | None, p: int) -> str:
    return "—" if x is None else f"{x / p:.4f}"


def to_markdown(res: dict[str, Any]) -> str:
    models = res["models"]
    lines = [
        f"Param trees: {res['source']}; fp32 params. State bytes from "
        "`jax.eval_shape(tx.init, params)` (nothing allocated). Each cell: measured state "
        "bytes / param bytes, and in brackets the ALGORITHMS.md §6 formula / param bytes "
        "(formula leaves out counters and keys).",
        "",
        "| optimizer | " + " | ".join(models) + " |",
        "|---" * (len(models) + 1) + "|",
        "| params | "
        + " | ".join(
            f"{res['param_count'][m] / 1e6:.1f}M ({common.fmt_bytes(res['param_bytes'][m])})"
            for m in models
        )
        + " |",
    ]
    names = [r["optimizer"] for r in res["rows"][models[0]]]
    for i, name in enumerate(names):
        cells = []
        for m in models:
            r = res["rows"][m][i]
            p = r["param_bytes"]
            if r["state_bytes"] is None:
                cells.append(f"not available [{_ratio(r['formula_bytes'], p)}]")
            else:
                cells.append(f"{_ratio(r['state_bytes'], p)} [{_ratio(r['formula_bytes'], p)}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    big = models[-1]
    lines += [
        "",
        f"Absolute optimizer state on {big} (fp32), next to the papers' claims:",
        "",
        "| optimizer | state (measured) | state (formula) | claim |",
        "|---|---|---|---|",
    ]
    for r in res["rows"][big]:
        meas = "not available" if r["state_bytes"] is None else common.fmt_bytes(r["state_bytes"])
        form = "—" if r["formula_bytes"] is None else common.fmt_bytes(r["formula_bytes"])
        lines.append(f"| {r['optimizer']} | {meas} | {form} | {CLAIMS.get(r['optimizer'], '')} |")
    missing = sorted({r["optimizer"]: r["status"] for r in res["rows"][big] if r["status"] != "ok"})
    if missing:
        lines += ["", "Not available in this run: " + ", ".join(missing) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(common.MODEL_SIZES))
    args = ap.parse_args(argv)
    print(to_markdown(run(tuple(args.models.split(",")))))


if __name__ == "__main__":
    main()
