"""Pretrain one model with one optimizer, with checkpoints and ``--resume``.

Usage::

    python -m experiments.pretrain --opt swan --opt.learning_rate 3e-3 --steps 1000
    python -m experiments.pretrain --opt adamw --out runs/pretrain/adamw --resume
    python -m experiments.pretrain --opt came --opt_json '{"b3": 0.999}' --corpus ~/my_text/

Hyperparameters are the factory's (`optim_transforms.hyperparameters(name)`),
as ``--opt.KEY VALUE`` flags or ``--opt_json``; an unknown one is an error
that lists the valid ones. Without ``--opt.learning_rate`` the peak comes from
``experiments/lr_table.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import optim_transforms as ot
from experiments import cli, hparams
from experiments.train import HESSIAN_ESTIMATOR, named_optimizer, run

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.pretrain",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--opt", default="adamw", help=f"optimizer: {', '.join(ot.names())}")
    p.add_argument("--opt_json", default=None, help="hyperparameters as JSON (inline or a file)")
    p.add_argument("--lr_table", default=str(cli.LR_TABLE_PATH), help="default peak lrs")
    p.add_argument(
        "--hessian",
        choices=("gnb", "hutchinson"),
        default=None,
        help=f"Hessian estimator for Sophia refresh steps (default {HESSIAN_ESTIMATOR})",
    )
    p.add_argument("--out", default=None, help="run folder (default runs/pretrain/OPT)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    cli.add_common_flags(p, checkpoint_every=50)
    return p


def main(argv: list[str] | None = None):
    """Trains; returns the `experiments.train.RunResult`."""
    parser = _parser()
    args, dotted = cli.parse_with_dotted(parser, argv, ("opt", "model"))
    ot.registry.factory(args.opt)
    raw = {**hparams.load_json_arg(args.opt_json), **dotted["opt"]}
    hp = hparams.optimizer_hparams(args.opt, raw)
    if "learning_rate" not in hp:
        table = cli.load_lr_table(args.lr_table)
        if args.opt not in table:
            raise ValueError(f"no learning rate for {args.opt!r}: pass --opt.learning_rate")
        hp["learning_rate"] = table[args.opt]
    cfg = cli.train_config(args, dotted["model"])
    out = pathlib.Path(args.out or f"runs/pretrain/{args.opt}")
    cli.enable_compile_cache(args)
    data = cli.load_data(args)
    spec = named_optimizer(args.opt, hp, hessian=args.hessian)
    result = run(cfg, data, spec, out, resume=args.resume)
    print(json.dumps(result.summary(), indent=1, default=str))
    print(f"metrics: {out / 'metrics.jsonl'}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
