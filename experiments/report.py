"""Markdown report and loss-curve PNGs for a set of runs."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
from collections import defaultdict
from typing import Any

import jax

__all__ = ["write_report", "plot_curves", "format_bytes"]


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if any(not math.isfinite(x) for x in xs):
        return "diverged"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def plot_curves(results: list[Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """``loss_vs_tokens.png`` and ``loss_vs_time.png`` (train loss thin, val loss with markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for xkey, xlabel, fname in (
        ("tokens", "training tokens", "loss_vs_tokens.png"),
        ("train_time_s", "training wall time (s, compile and eval excluded)", "loss_vs_time.png"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        for i, r in enumerate(results):
            color = f"C{i % 10}"
            tr = [x for x in r.records if "train_loss" in x and math.isfinite(x["train_loss"])]
            va = [x for x in r.records if "val_loss" in x and math.isfinite(x["val_loss"])]
            if tr:
                ax.plot(
                    [x[xkey] for x in tr],
                    [x["train_loss"] for x in tr],
                    color=color,
                    alpha=0.35,
                    lw=1,
                )
            if va:
                ax.plot(
                    [x[xkey] for x in va],
                    [x["val_loss"] for x in va],
                    color=color,
                    marker="o",
                    ms=3,
                    lw=1.5,
                    label=r.label,
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token); thin: train, markers: validation")
        finals = [r.val_loss for r in results if math.isfinite(r.val_loss)]
        if finals:
            lo = min(finals)
            ax.set_ylim(lo - 0.3, lo + 3.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(
    out_dir: pathlib.Path,
    results: list[Any],
    *,
    title: str,
    cfg: Any,
    data: Any,
    command: str,
    notes: list[str] = (),
    group_key: str = "label",
) -> pathlib.Path:
    """Writes ``report.md``, ``results.json`` and the two PNGs into ``out_dir``.

    Args:
      results: `experiments.train.RunResult`s; runs with the same ``group_key``
        attribute (e.g. several seeds of one optimizer) share a table row
        (mean ± sample std).
      title: report heading.
      cfg: the `TrainConfig`.
      data: the `TokenizedCorpus`.
      command: the command line, recorded in the report.
      notes: extra lines (skipped optimizers, sweep choices, ...).

    Returns:
      The path of ``report.md``. In a multi-process run only process 0 writes
      (every process holds the same results); the others return the path.
    """
    if jax.process_index() != 0:
        return out_dir / "report.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(results, out_dir)
    groups: dict[str, list[Any]] = defaultdict(list)
    for r in results:
        groups[getattr(r, group_key)].append(r)
    first = results[0] if results else None
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"- corpus: {data.corpus_name} — train {data.train_bytes:,} bytes / {len(data.train):,} "
        f"tokens, validation {data.val_bytes:,} bytes / {len(data.val):,} tokens "
        f"(fingerprint {data.fingerprint[:12]})",
        f"- tokenizer: {data.tokenizer.name} (vocab {data.tokenizer.vocab_size})",
        f"- model: {cfg.model} {cfg.model_overrides or ''} — {first.param_count:,} parameters"
        if first
        else f"- model: {cfg.model}",
        f"- {cfg.steps} steps × batch {cfg.batch_size} × seq {cfg.seq_len} "
        f"(grad_accum {cfg.grad_accum}); warmup {cfg.warmup_frac:.0%} then cosine to "
        f"{cfg.final_lr_frac:.0%} of the peak; validation on {cfg.eval_batches} fixed batches",
        f"- mesh (data, fsdp, tensor): {cfg.mesh or 'all devices on data'}; seed(s) as listed",
        "",
        "| optimizer | peak lr | runs | final val loss | bits/byte | tokens/s | "
        "optimizer state | compiled peak memory / device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rs in groups.items():
        tps = [r.tokens_per_s for r in rs if math.isfinite(r.tokens_per_s)]
        lr = "in spec" if rs[0].peak_lr is None else f"{rs[0].peak_lr:g}"
        lines.append(
            f"| {label} | {lr} | {len(rs)} | {_mean_std([r.val_loss for r in rs])} | "
            f"{_mean_std([r.val_bpb for r in rs])} | "
            f"{f'{statistics.mean(tps):,.0f}' if tps else 'n/a'} | "
            f"{format_bytes(rs[0].opt_state_bytes)} | {format_bytes(rs[0].peak_memory_bytes)} |"
        )
    lines += [
        "",
        "Loss is the mean next-token cross-entropy in nats; bits/byte = loss × tokens / bytes "
        "/ ln 2 over the validation batches (tokenizers with different vocabularies compare on "
        "it). tokens/s excludes compilation and evaluation. Optimizer state is the total size of "
        "the state arrays; peak memory is XLA's `memory_analysis()` of the compiled step "
        "(per device). Differences under ~0.05 nats are within seed noise at this scale.",
        "",
        *(f"- {n}" for n in notes),
        "",
        *(f"![{p.stem}]({p.name})" for p in plots),
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    summary = {
        "config": dataclasses.asdict(cfg),
        "corpus": {
            "name": data.corpus_name,
            "fingerprint": data.fingerprint,
            "train_bytes": data.train_bytes,
            "val_bytes": data.val_bytes,
            "train_tokens": len(data.train),
            "val_tokens": len(data.val),
            "tokenizer": data.tokenizer.name,
        },
        "runs": [r.summary() for r in results],
        "notes": list(notes),
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    return path
