"""Train hand-written transform chains on the same task and compare them.

Usage::

    python -m experiments.ordering \
        "scale_by_adam,scale(-1e-2)" \
        "cautious_mask(scale_by_adam),scale(-1e-2)" \
        "grad_norm,whiten,scale(-1e-2)" \
        "whiten,grad_norm,scale(-1e-2)"

A chain spec is a comma-separated list of transforms from
`optim_transforms.registry.TRANSFORMS`, each optionally called with literal
or transform arguments (``cautious_mask(scale_by_adam(b1=0.9))``); see
`experiments.chain_spec`. The learning rate is the one the spec writes
(``scale(-1e-2)``); the run's warmup + cosine schedule multiplies it (peak
factor 1). Chains are applied to every parameter as written (no AdamW routing
of embeddings or 1-D params, unlike the named optimizers). A chain containing
``hutchinson_precond`` gets Hessian refresh steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shlex
import sys

import optax

from experiments import cli
from experiments.chain_spec import build_chain, parse_chain
from experiments.report import write_report
from experiments.train import OptimizerSpec, run

__all__ = ["main", "chain_optimizer"]


def _uses(calls, name: str) -> bool:
    from experiments.chain_spec import TransformCall

    def walk(x):
        if isinstance(x, TransformCall):
            return x.name == name or any(map(walk, (*x.args, *x.kwargs.values())))
        return False

    return any(walk(c) for c in calls)


def _update_every(calls) -> int:
    from experiments.chain_spec import TransformCall
    from optim_transforms.registry import transform_hyperparameters

    def find(x):
        if isinstance(x, TransformCall):
            if x.name == "hutchinson_precond" and "update_every" in x.kwargs:
                return x.kwargs["update_every"]
            for y in (*x.args, *x.kwargs.values()):
                v = find(y)
                if v is not None:
                    return v
        return None

    for c in calls:
        v = find(c)
        if v is not None:
            return int(v)
    return int(transform_hyperparameters("hutchinson_precond")["update_every"])


def chain_optimizer(spec: str, *, hessian: str = "hutchinson") -> OptimizerSpec:
    """`OptimizerSpec` for a chain spec (`ChainSpecError` if it does not build)."""
    calls = parse_chain(spec)
    build_chain(spec)  # fail early with a clear error, before any data or model work
    needs_h = _uses(calls, "hutchinson_precond")

    def build(factor: optax.Schedule) -> optax.GradientTransformation:
        return optax.chain(build_chain(spec), optax.scale_by_schedule(factor))

    return OptimizerSpec(
        label=spec,
        build=build,
        peak_lr=None,
        hessian=hessian if needs_h else None,
        update_every=_update_every(calls) if needs_h else 1,
        hparams={"chain": spec},
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.ordering",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("chains", nargs="+", help="chain specs, e.g. 'grad_norm,whiten,scale(-1e-2)'")
    p.add_argument(
        "--hessian",
        choices=("hutchinson", "gnb"),
        default="hutchinson",
        help="estimator for chains with hutchinson_precond",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--out", default="runs/ordering", help="output folder")
    cli.add_common_flags(p)
    return p


def main(argv: list[str] | None = None) -> pathlib.Path:
    """Runs every chain; returns the report path."""
    parser = _parser()
    args, dotted = cli.parse_with_dotted(parser, argv, ("model",))
    specs = [chain_optimizer(c, hessian=args.hessian) for c in args.chains]
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = cli.train_config(args, dotted["model"])
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    cli.enable_compile_cache(args)
    data = cli.load_data(args)
    results = []
    for seed in seeds:
        for i, spec in enumerate(specs):
            r = run(
                dataclasses.replace(cfg, seed=seed),
                data,
                spec,
                out / "runs" / f"chain{i}-seed{seed}",
                metrics_path=out / "metrics.jsonl",
                run_name=f"{spec.label} seed={seed}",
            )
            results.append(r)
    command = "python -m experiments.ordering " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    path = write_report(
        out,
        results,
        title="Transform orderings",
        cfg=cfg,
        data=data,
        command=command,
        notes=[
            "each chain's learning rate is the one in its spec; the warmup + cosine schedule "
            "multiplies it",
            "chains act on every parameter as written (no AdamW routing)",
        ],
    )
    print(path.read_text().split("\n\n![")[0])
    print(f"\nreport: {path}")
    return path


if __name__ == "__main__":
    main()
