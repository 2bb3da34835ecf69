"""Compare optimizers on the same model, data and seeds; write a Markdown report with plots.

Usage::

    python -m experiments.compare                      # DEFAULT_OPTIMIZERS on the embedded corpus
    python -m experiments.compare --opts adamw,swan --steps 500 --seeds 0,1,2
    python -m experiments.compare --opts swan --sweep  # factor-2 learning-rate sweep
    python -m experiments.compare --opt.swan.learning_rate 3e-3 --opt.came.b3 0.999

Each optimizer's peak learning rate comes from ``--opt.NAME.learning_rate``,
else from the committed table ``experiments/lr_table.json``. Other
hyperparameters default to the factory signature (see
`optim_transforms.hyperparameters`). Optimizers that are not implemented yet
(their factory raises `NotImplementedError`) are skipped and listed in the
report.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import shlex
import statistics
import sys
import time
import traceback

import optim_transforms as ot
from experiments import cli, hparams
from experiments.report import write_report
from experiments.train import named_optimizer, run

__all__ = ["DEFAULT_OPTIMIZERS", "DEFAULT_STEPS", "main"]

# The README's main comparison (issue 8): AdamW vs the optimizers of this library.
DEFAULT_OPTIMIZERS = ("adamw", "swan", "sophia_g", "apollo_mini", "cautious_adamw", "came")
# 6 optimizers x 200 steps (0.8M tokens each; ~1.1 CPU-s per step measured, i.e. ~2 min per run on
# 2 cores) plus compilation and evaluation fit in ~15 min.
DEFAULT_STEPS = 200
_OUTPUTS = ("report.md", "results.json", "metrics.jsonl", "loss_vs_tokens.png", "loss_vs_time.png")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--opts",
        default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma-separated optimizers; registered: {', '.join(ot.names())}",
    )
    p.add_argument(
        "--opt_json",
        default=None,
        help='per-optimizer hyperparameters as JSON (inline or a file): {"swan": {"b1": 0.9}}; '
        "or flags --opt.NAME.KEY VALUE",
    )
    p.add_argument("--lr_table", default=str(cli.LR_TABLE_PATH), help="peak learning rates")
    p.add_argument("--sweep", action="store_true", help="sweep each learning rate (see factors)")
    p.add_argument("--sweep_factors", default="0.5,1,2", help="multipliers of the table's lr")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (same for every optimizer)")
    p.add_argument("--out", default="runs/compare", help="output folder")
    cli.add_common_flags(p, steps=DEFAULT_STEPS)
    return p


def _per_optimizer(flags: dict[str, str], json_arg: str | None, names: list[str]) -> dict:
    out: dict[str, dict] = {n: {} for n in names}
    for name, values in hparams.load_json_arg(json_arg).items():
        if name not in out:
            raise ValueError(f"--opt_json names {name!r}, which is not in --opts {names}")
        out[name].update(values)
    for key, value in flags.items():
        if "." not in key:
            raise ValueError(
                f"--opt.{key}: compare takes --opt.OPTIMIZER.HYPERPARAMETER (e.g. "
                f"--opt.{names[0]}.{key})"
            )
        name, hp = key.split(".", 1)
        if name not in out:
            raise ValueError(f"--opt.{key}: {name!r} is not in --opts {names}")
        out[name][hp] = value
    return {n: hparams.optimizer_hparams(n, v) for n, v in out.items()}


def _implemented(name: str, hp: dict) -> str | None:
    """None if ``name`` builds, else why not (placeholder factories raise NotImplementedError)."""
    try:
        ot.build(name, **hp)
    except NotImplementedError as e:
        return f"not implemented yet ({e})"
    return None


def _fmt_lr(x: float) -> str:
    return f"{x:.3g}"


def main(argv: list[str] | None = None) -> pathlib.Path:
    """Runs the comparison; returns the report path."""
    t_start = time.perf_counter()
    parser = _parser()
    args, dotted = cli.parse_with_dotted(parser, argv, ("opt", "model"))
    names = [n.strip() for n in args.opts.split(",") if n.strip()]
    for n in names:
        ot.registry.factory(n)  # unknown name → ValueError listing the valid ones
    seeds = [int(s) for s in args.seeds.split(",")]
    factors = [float(f) for f in args.sweep_factors.split(",")] if args.sweep else [1.0]
    cfg = cli.train_config(args, dotted["model"])
    per_opt = _per_optimizer(dotted["opt"], args.opt_json, names)
    table = cli.load_lr_table(args.lr_table)

    notes, specs = [], []
    for name in names:
        hp = dict(per_opt[name])
        if "learning_rate" not in hp:
            if name not in table:
                raise ValueError(
                    f"no learning rate for {name!r}: add it to {args.lr_table} or pass "
                    f"--opt.{name}.learning_rate"
                )
            hp["learning_rate"] = table[name]
        why = _implemented(name, hp)
        if why:
            notes.append(f"skipped {name}: {why}")
            print(f"[compare] skipping {name}: {why}", file=sys.stderr)
            continue
        base = hp["learning_rate"]
        for f in factors:
            label = f"{name} lr={_fmt_lr(base * f)}" if args.sweep else name
            specs.append(named_optimizer(name, {**hp, "learning_rate": base * f}, label=label))
    if not specs:
        raise SystemExit("no optimizer to run: " + "; ".join(notes))

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in _OUTPUTS:
        (out / f).unlink(missing_ok=True)
    cli.enable_compile_cache(args)
    data = cli.load_data(args)
    print(
        f"[compare] corpus {data.corpus_name}: {data.train_bytes:,} train bytes, "
        f"{len(data.train):,} tokens ({data.tokenizer.name}); {len(specs)} optimizer runs x "
        f"{len(seeds)} seed(s) x {cfg.steps} steps",
        file=sys.stderr,
    )
    results, failures = [], []
    for seed in seeds:
        for spec in specs:
            name = f"{spec.label} seed={seed}"
            try:
                r = run(
                    dataclasses.replace(cfg, seed=seed),
                    data,
                    spec,
                    out / "runs" / f"{spec.label.replace(' ', '_')}-seed{seed}",
                    metrics_path=out / "metrics.jsonl",
                    run_name=name,
                )
            except Exception as e:  # one broken optimizer must not lose the others' results
                failures.append(name)
                tb = traceback.format_exc(limit=3).strip().splitlines()
                notes.append(
                    f"{name} failed: {type(e).__name__}: {e} ({tb[-3] if len(tb) > 2 else ''})"
                )
                print(f"[compare] {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
                continue
            results.append(r)
            print(
                f"[compare] {name}: val loss {r.val_loss:.4f}, {r.val_bpb:.4f} bits/byte, "
                f"{r.tokens_per_s:,.0f} tokens/s",
                file=sys.stderr,
            )
    if args.sweep:
        for name in names:
            rows = {}
            for r in results:
                if r.hparams.get("optimizer") == name and math.isfinite(r.val_loss):
                    rows.setdefault(r.peak_lr, []).append(r.val_loss)
            if rows:
                best = min(rows, key=lambda lr: statistics.mean(rows[lr]))
                notes.append(
                    f"sweep: best peak lr for {name} is {_fmt_lr(best)} "
                    f"(val loss {statistics.mean(rows[best]):.4f}); record it in {args.lr_table}"
                )
    wall = time.perf_counter() - t_start
    notes.append(f"total wall time {wall:.0f} s (including tokenizer, compilation and evaluation)")
    command = "python -m experiments.compare " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    path = write_report(
        out,
        results,
        title="Optimizer comparison",
        cfg=cfg,
        data=data,
        command=command.strip(),
        notes=notes,
    )
    print(path.read_text().split("\n\n![")[0])
    print(f"\nreport: {path}\nplots: {out / 'loss_vs_tokens.png'}, {out / 'loss_vs_time.png'}")
    print(f"metrics: {out / 'metrics.jsonl'}\nwall time: {wall:.0f} s")
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed: {', '.join(failures)} (see {path})")
    return path


if __name__ == "__main__":
    main()
