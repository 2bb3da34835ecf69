"""Convergence: `experiments.compare` on llama-1m, 3 seeds, the committed learning rates.

Runs ``python -m experiments.compare`` in a subprocess (its own memory and
compilation caches) on the embedded corpus with fixed tokens, every
implemented registry optimizer whose peak learning rate in the committed
table ``experiments/lr_table.json`` was measured by a factor-2 sweep
(``compare --sweep``; optimizers with only a prior rate are listed as not
run; ``--quick``: compare's default set of optimizers, short runs), and reads
back ``results.json``: final validation loss mean ± std over seeds and the
loss-curve PNGs that compare writes.

Run: ``python -m experiments.bench.convergence [--quick] [--out benchmarks/convergence]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
from collections import defaultdict
from typing import Any

from experiments.bench import common

__all__ = ["compare_argv", "run", "summarize", "to_markdown", "FULL", "QUICK"]

# compare's own defaults (llama-1m, seq 128, batch 32, 250 steps) for the full run;
# a short run for --quick.
FULL: dict[str, Any] = {"seeds": "0,1,2"}
QUICK: dict[str, Any] = {
    "seeds": "0,1,2",
    "steps": 40,
    "batch_size": 16,
    "seq_len": 64,
    "eval_every": 20,
    "eval_batches": 4,
}


def swept_names(table_path: pathlib.Path | None = None) -> tuple[list[str], dict[str, str]]:
    """``(names, {name: why not})``: registry optimizers with a swept learning rate."""
    from experiments.cli import LR_TABLE_PATH

    path = table_path or LR_TABLE_PATH
    source = json.loads(path.read_text()).get("source", {})
    names, skipped = [], {}
    for n in common.optimizer_names():
        if str(source.get(n, "")).startswith("measured"):
            names.append(n)
        else:
            why = source.get(n, "absent")
            skipped[n] = f"not run: learning rate not swept ({why}, {path.name})"
    return names, skipped


def available_names(names: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``(implemented, {name: why not})`` among ``names`` (default: the whole registry)."""
    ok, missing = [], {}
    for n in names or common.optimizer_names():
        a = common.try_build(n)
        if a.ok:
            ok.append(n)
        else:
            missing[n] = a.reason
    return ok, missing


def compare_argv(names: list[str], out: pathlib.Path, settings: dict[str, Any]) -> list[str]:
    """The ``experiments.compare`` command line."""
    argv = [sys.executable, "-m", "experiments.compare", "--opts", ",".join(names)]
    argv += ["--out", str(out), "--no_progress"]
    for k, v in settings.items():
        argv += [f"--{k}", str(v)]
    return argv


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{optimizer: {"losses": [...], "mean", "std", "bpb", "peak_lr", "diverged"}}``."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results["runs"]:
        groups[r["label"]].append(r)
    out = {}
    for label, runs in groups.items():
        losses = [float(r["val_loss"]) for r in runs]
        out[label] = {
            "losses": losses,
            "seeds": [r["seed"] for r in runs],
            "mean": statistics.mean(losses),
            "std": statistics.stdev(losses) if len(losses) > 1 else float("nan"),
            "bpb": statistics.mean(float(r["val_bpb"]) for r in runs),
            "tokens_per_s": statistics.mean(float(r["tokens_per_s"]) for r in runs),
            "peak_lr": runs[0].get("peak_lr"),
            "diverged": any(r.get("diverged") for r in runs),
        }
    return out


def run(
    out: pathlib.Path,
    *,
    quick: bool = False,
    names: list[str] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Runs compare (see module doc); returns the summary and where the plots are."""
    settings = dict(QUICK if quick else FULL)
    skipped: dict[str, str] = {}
    if names is None and quick:
        from experiments.compare import DEFAULT_OPTIMIZERS

        names = list(DEFAULT_OPTIMIZERS)
    elif names is None:
        names, skipped = swept_names()
    ok, missing = available_names(names)
    missing.update(skipped)
    res: dict[str, Any] = {"settings": settings, "missing": missing, "out": str(out)}
    if not ok:
        res["error"] = "no implemented optimizer"
        return res
    argv = compare_argv(ok, out, settings)
    # The page shows the command from the project root, not this machine's absolute paths.
    shown = compare_argv(ok, pathlib.Path(os.path.relpath(out.resolve(), common.ROOT)), settings)
    res["command"] = " ".join(["python"] + shown[1:])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    res["returncode"] = proc.returncode
    path = out / "results.json"
    if not path.exists():
        res["error"] = (
            f"compare wrote no results.json (exit {proc.returncode}): "
            + (proc.stderr.strip().splitlines() or [""])[-1][:300]
        )
        return res
    results = json.loads(path.read_text())
    res["config"] = results.get("config", {})
    res["corpus"] = results.get("corpus", {})
    res["notes"] = results.get("notes", [])
    res["rows"] = summarize(results)
    res["plots"] = [str(p) for p in sorted(out.glob("*.png"))]
    return res


def to_markdown(res: dict[str, Any], relative_to: pathlib.Path | None = None) -> str:
    if "rows" not in res:
        return f"Not run: {res.get('error', 'unknown')}."
    cfg, corpus = res.get("config", {}), res.get("corpus", {})
    lines = [
        f"`{res['command']}` — model {cfg.get('model')}, {cfg.get('steps')} steps of "
        f"{cfg.get('batch_size')} x {cfg.get('seq_len')} tokens, warmup "
        f"{cfg.get('warmup_frac')} + cosine to {cfg.get('final_lr_frac')} of the peak; corpus "
        f"{corpus.get('name')} ({corpus.get('train_tokens')} train tokens, tokenizer "
        f"{corpus.get('tokenizer')}). Peak learning rates from `experiments/lr_table.json`.",
        "",
        "| optimizer | peak lr | final val loss (mean ± std) | seeds | bits/byte | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    rows = sorted(res["rows"].items(), key=lambda kv: kv[1]["mean"])
    for name, r in rows:
        flag = " (diverged)" if r["diverged"] else ""
        lines.append(
            f"| {name} | {r['peak_lr']:.3g} | {r['mean']:.4f} ± {r['std']:.4f}{flag} | "
            f"{len(r['losses'])} | {r['bpb']:.4f} | {r['tokens_per_s']:,.0f} |"
        )
    for name, why in res["missing"].items():
        lines.append(f"| {name} | | {why} | | | |")
    lines.append("")
    for p in res.get("plots", []):
        path = pathlib.Path(p)
        shown = os.path.relpath(path, relative_to) if relative_to else path
        lines.append(f"![{path.stem}]({shown})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/convergence")
    ap.add_argument("--opts", default=None, help="comma-separated (default: all swept)")
    args = ap.parse_args(argv)
    names = args.opts.split(",") if args.opts else None
    res = run(pathlib.Path(args.out), quick=args.quick, names=names)
    print(to_markdown(res))


if __name__ == "__main__":
    main()
