"""The training loop: corpus → tokens → sharded batch → step → metrics → checkpoint.

`run` trains one `models.llama.Llama` with one optimizer (an `OptimizerSpec`)
on a `(data, fsdp, tensor)` mesh, with warmup + cosine learning rate,
gradient accumulation, Sophia refresh steps, periodic evaluation, atomic
checkpoints and bit-exact ``resume``. The CLIs (`experiments.pretrain`,
`experiments.compare`, `experiments.ordering`) are thin wrappers around it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import optim_transforms as ot
from experiments import checkpoint
from experiments.data import TrainBatches, eval_batches
from experiments.tokenizer import TokenizedCorpus

__all__ = [
    "HESSIAN_ESTIMATOR",
    "TrainConfig",
    "OptimizerSpec",
    "named_optimizer",
    "RunResult",
    "schedule",
    "run",
]

# Which Hessian-diagonal estimator a named optimizer is fed (Sophia paper, §2).
HESSIAN_ESTIMATOR = {"sophia_g": "gnb", "sophia_h": "hutchinson"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What is shared by every run of a comparison (model, data, schedule, budget).

    Attributes:
      model: a `models.llama.CONFIGS` name; ``vocab_size`` always comes from
        the tokenizer.
      model_overrides: `LlamaConfig` fields to replace.
      seq_len, batch_size: tokens per example, examples per optimizer step
        (the global batch over all accumulation steps and devices).
      grad_accum: micro-batches per step.
      steps: optimizer steps.
      warmup_frac, final_lr_frac: linear warmup over this fraction of the
        steps, then cosine decay to ``final_lr_frac * peak``.
      eval_every, eval_batches: evaluate the validation loss every so many
        steps (and at the end) on this many fixed batches.
      log_every: steps between train-loss records.
      checkpoint_every: steps between checkpoints (0: none; the last step is
        always saved when > 0).
      keep_checkpoints: checkpoints kept on disk.
      seed: model init, data order and Hessian-estimate randomness.
      mesh: ``(data, fsdp, tensor)`` sizes; None = all devices on ``data``.
      progress: show a tqdm progress bar.
    """

    model: str = "llama-1m"
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    seq_len: int = 128
    batch_size: int = 32
    grad_accum: int = 1
    steps: int = 250
    warmup_frac: float = 0.1
    final_lr_frac: float = 0.1
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    mesh: tuple[int, int, int] | None = None
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer to train with.

    Attributes:
      label: name in reports (e.g. ``"swan"``, ``"adamw lr=2e-3"``).
      build: ``schedule -> GradientTransformation`` (the schedule's peak is
        ``peak_lr``).
      peak_lr: peak learning rate; None when the transform carries its own
        (a chain spec's ``scale(-lr)``) and the schedule is a factor peaking at 1.
      hessian: None, ``"gnb"`` or ``"hutchinson"`` (Sophia refresh steps).
      update_every, refresh_phase: refresh on the steps (0-based) with
        ``step % update_every == refresh_phase``.
      hparams: what to record in reports.
    """

    label: str
    build: Callable[[optax.Schedule], optax.GradientTransformation]
    peak_lr: float | None
    hessian: str | None = None
    update_every: int = 10
    refresh_phase: int = 0
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)


def _refresh_schedule(name: str, hparams: dict[str, Any]) -> tuple[int, int]:
    """``(update_every, refresh_phase)`` of a Sophia optimizer from its hyperparameters."""
    full = {**ot.hyperparameters(name), **hparams}
    if "update_every" not in full:
        from optim_transforms.registry import transform_hyperparameters

        full["update_every"] = transform_hyperparameters("hutchinson_precond")["update_every"]
    k = int(full["update_every"])
    phase = ot.resolve_refresh_phase(
        k,
        official_code_form=bool(full.get("official_code_form")),
        hessian_update_order=full.get("hessian_update_order"),
        refresh_phase=full.get("refresh_phase"),
    )
    return k, phase


def named_optimizer(
    name: str, hparams: dict[str, Any], *, label: str | None = None, hessian: str | None = None
) -> OptimizerSpec:
    """`OptimizerSpec` for registry optimizer ``name``; ``hparams["learning_rate"]`` is the peak.

    Sophia optimizers get refresh steps with the estimator of
    `HESSIAN_ESTIMATOR` (``hessian`` overrides it) on the steps their
    ``update_every`` / ``hessian_update_order`` / ``refresh_phase`` select.
    """
    if "learning_rate" not in hparams:
        raise ValueError(f"optimizer {name!r}: no learning_rate given")
    peak = float(hparams["learning_rate"])
    rest = {k: v for k, v in hparams.items() if k != "learning_rate"}
    ot.registry.factory(name)  # unknown name → ValueError listing the valid ones
    hessian = hessian or HESSIAN_ESTIMATOR.get(name)

    def build(sched):
        return ot.build(name, learning_rate=sched, **rest)

    k, phase = _refresh_schedule(name, hparams) if hessian else (1, 0)
    return OptimizerSpec(
        label=label or name,
        build=build,
        peak_lr=peak,
        hessian=hessian,
        update_every=k,
        refresh_phase=phase,
        hparams={"optimizer": name, **hparams},
    )


def schedule(cfg: TrainConfig, peak: float) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_frac`` of the steps, cosine to ``final_lr_frac``."""
    warmup = max(1, int(round(cfg.warmup_frac * cfg.steps)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1),
        end_value=cfg.final_lr_frac * peak,
    )


@dataclasses.dataclass
class RunResult:
    """Summary of one run (also the last line of its JSONL)."""

    label: str
    steps: int
    tokens: int
    val_loss: float
    val_bpb: float
    tokens_per_s: float
    train_time_s: float
    compile_time_s: float
    opt_state_bytes: int
    peak_memory_bytes: int | None
    param_count: int
    diverged: bool
    peak_lr: float | None
    seed: int
    hparams: dict[str, Any]
    records: list[dict[str, Any]]
    final_params: Any = dataclasses.field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """The scalar fields (no curves, no params)."""
        skip = ("records", "final_params")
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }


class MetricsWriter:
    """Appends JSON lines (and TensorBoard scalars when tensorboardX is installed).

    In a multi-process run only process 0 writes (the metrics are global); on
    the other processes every method is a no-op.
    """

    def __init__(self, path: pathlib.Path, *, run: str, truncate_after: int | None = None):
        self.path, self.run = path, run
        self._f = self._tb = None
        if jax.process_index() != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and path.exists():
            # On resume, drop what the interrupted run logged after its checkpoint.
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip()
                and not (
                    json.loads(line).get("run") == run
                    and json.loads(line).get("step", 0) > truncate_after
                )
            ]
            path.write_text("".join(k + "\n" for k in kept))
        self._f = open(path, "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(path.parent / "tensorboard" / run))
        except ImportError:
            pass

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        record = {"run": self.run, **record}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "run"):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._tb is not None:
            self._tb.close()


def _mesh(cfg: TrainConfig):
    from models.sharding import make_mesh

    data, fsdp, tensor = cfg.mesh or (jax.device_count(), 1, 1)
    per_step = cfg.batch_size // cfg.grad_accum
    if cfg.batch_size % cfg.grad_accum or per_step % (data * fsdp):
        raise ValueError(
            f"batch_size={cfg.batch_size} / grad_accum={cfg.grad_accum} must be a multiple of "
            f"the data-parallel size data*fsdp={data * fsdp}"
        )
    return make_mesh(data, fsdp, tensor)


def _device_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    n, i = jax.process_count(), jax.process_index()

    def put(x):
        rows = x.shape[0] // n
        return jax.make_array_from_process_local_data(sharding, x[i * rows : (i + 1) * rows])

    return {k: put(v) for k, v in batch.items()}


def _peak_bytes(mem) -> int | None:
    if mem is None:
        return None
    peak = getattr(mem, "peak_memory_in_bytes", 0)
    if peak:
        return int(peak)
    return int(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )


def run(
    cfg: TrainConfig,
    data: TokenizedCorpus,
    opt: OptimizerSpec,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    metrics_path: str | os.PathLike | None = None,
    run_name: str | None = None,
) -> RunResult:
    """Trains ``opt`` on ``data`` under ``cfg``; writes metrics and checkpoints under ``out_dir``.

    Args:
      cfg: the shared configuration.
      data: tokenized corpus (`experiments.tokenizer.tokenize_corpus`).
      opt: the optimizer.
      out_dir: this run's folder (``checkpoints/`` goes there).
      resume: continue from the latest checkpoint in ``out_dir/checkpoints``
        (`checkpoint.CheckpointError` if there is none or it is damaged).
      metrics_path: JSONL file (default ``out_dir/metrics.jsonl``).
      run_name: the ``run`` field of its JSONL records (default ``opt.label``).

    Returns:
      A `RunResult`.
    """
    from flax import nnx

    from models import llama
    from models.sharding import LOGICAL_AXIS_RULES, create_model
    from models.train import loss_fn, make_train_step

    out_dir = pathlib.Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    mcfg = llama.get_config(
        cfg.model, **{**cfg.model_overrides, "vocab_size": data.tokenizer.vocab_size}
    )
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(
            f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}"
        )
    mesh = _mesh(cfg)
    model = create_model(mcfg, mesh, seed=cfg.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    del model
    sched = schedule(cfg, 1.0 if opt.peak_lr is None else opt.peak_lr)
    tx = opt.build(sched)
    ts = make_train_step(graphdef, tx, mesh, params, hessian=opt.hessian, grad_accum=cfg.grad_accum)
    opt_state = ts.init_opt_state(params)
    rng = jax.random.key(cfg.seed)
    batches = TrainBatches(data.train, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    start = 0
    if resume:
        trees, meta = checkpoint.restore(
            ckpt_dir, {"params": params, "opt_state": opt_state, "rng": rng}
        )
        params, opt_state, rng = trees["params"], trees["opt_state"], trees["rng"]
        start, batches.position = int(meta["step"]), int(meta["data_position"])

    evals = eval_batches(data.val, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    eval_tokens = sum(b["targets"].size for b in evals)
    eval_bytes = int(sum(data.tokenizer.token_bytes[b["targets"]].sum() for b in evals))
    eval_dev = [_device_batch(b, ts.batch_sharding) for b in evals]
    eval_jit = jax.jit(
        lambda p, b: loss_fn(graphdef, p, b)[0],
        in_shardings=(ts.param_shardings, ts.batch_sharding),
    )

    def evaluate(p) -> tuple[float, float]:
        with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
            losses = [eval_jit(p, b) for b in eval_dev]
        loss = float(np.mean([float(x) for x in losses]))
        return loss, loss * eval_tokens / eval_bytes / math.log(2)

    sample = eval_dev[0]  # same shapes and sharding as a train batch
    mem = ts.compiled_memory(params, opt_state, sample, rng)
    peak_mem = _peak_bytes(mem)
    if ts.refresh_step is not None:
        peak_r = _peak_bytes(ts.compiled_memory(params, opt_state, sample, rng, refresh=True))
        peak_mem = max(peak_mem or 0, peak_r or 0) or None
    opt_state_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state) if hasattr(x, "nbytes"))
    n_params = sum(x.size for x in jax.tree.leaves(params))

    writer = MetricsWriter(
        pathlib.Path(metrics_path or out_dir / "metrics.jsonl"),
        run=run_name or opt.label,
        truncate_after=start if resume else None,
    )
    tokens_per_step = cfg.batch_size * cfg.seq_len
    train_time = compile_time = 0.0
    compiled: set[str] = set()
    window: list[float] = []
    records: list[dict[str, Any]] = []
    diverged = False
    val_loss = val_bpb = float("nan")

    def record(r):
        records.append(r)
        writer.write(r)

    if start >= cfg.steps:  # resumed a finished run: just report it
        val_loss, val_bpb = evaluate(params)
    if start == 0:
        val_loss, val_bpb = evaluate(params)
        record(
            {"step": 0, "tokens": 0, "train_time_s": 0.0, "val_loss": val_loss, "val_bpb": val_bpb}
        )

    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=run_name or opt.label,
        disable=not cfg.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    step = start
    try:
        for step in range(start, cfg.steps):
            refresh = opt.hessian is not None and step % opt.update_every == opt.refresh_phase
            fn = ts.refresh_step if refresh else ts.step
            batch = _device_batch(next(batches), ts.batch_sharding)
            key = jax.random.fold_in(rng, step)
            t0 = time.perf_counter()
            params, opt_state, metrics = fn(params, opt_state, batch, key)
            loss = float(metrics["loss"])
            dt = time.perf_counter() - t0
            name = "refresh" if refresh else "step"
            if name in compiled:
                train_time += dt
            else:
                compiled.add(name)
                compile_time += dt
            window.append(loss)
            done = step + 1
            if not math.isfinite(loss):
                diverged = True
            if done % cfg.log_every == 0 or done == cfg.steps or diverged:
                tps = tokens_per_step * (done - start - len(compiled)) / max(train_time, 1e-9)
                record(
                    {
                        "step": done,
                        "tokens": done * tokens_per_step,
                        "train_time_s": train_time,
                        "lr": float(sched(step)),
                        "train_loss": float(np.mean(window)),
                        "grad_norm": float(metrics["grad_norm"]),
                        "tokens_per_s": tps,
                    }
                )
                window.clear()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            if diverged:
                break
            if done % cfg.eval_every == 0 or done == cfg.steps:
                val_loss, val_bpb = evaluate(params)
                record(
                    {
                        "step": done,
                        "tokens": done * tokens_per_step,
                        "train_time_s": train_time,
                        "val_loss": val_loss,
                        "val_bpb": val_bpb,
                    }
                )
            if cfg.checkpoint_every > 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                checkpoint.save(
                    ckpt_dir,
                    done,
                    {"params": params, "opt_state": opt_state, "rng": rng},
                    {"data_position": batches.position, "label": opt.label, "seed": cfg.seed},
                    keep=cfg.keep_checkpoints,
                )
            bar.update(1)
    finally:
        bar.close()
    done = step + 1 if cfg.steps > start else start
    if diverged:
        val_loss = val_bpb = float("nan")
    steady = done - start - len(compiled)
    result = RunResult(
        label=opt.label,
        steps=done,
        tokens=done * tokens_per_step,
        val_loss=val_loss,
        val_bpb=val_bpb,
        tokens_per_s=tokens_per_step * steady / train_time if train_time > 0 else float("nan"),
        train_time_s=train_time,
        compile_time_s=compile_time,
        opt_state_bytes=int(opt_state_bytes),
        peak_memory_bytes=peak_mem,
        param_count=int(n_params),
        diverged=diverged,
        peak_lr=opt.peak_lr,
        seed=cfg.seed,
        hparams=opt.hparams,
        records=records,
        final_params=params,
    )
    writer.write({"step": done, "summary": result.summary()})
    writer.close()
    return result
