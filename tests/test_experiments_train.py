"""experiments end to end: kill + resume is bit-exact; a short compare writes its report.

The runs use the real CLIs in subprocesses (2 fake CPU devices, mesh data=2)
on a tiny LLaMA and a small corpus cut from the standard library, sharing a
JAX persistent compilation cache so that only the first run of each program
compiles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from experiments import checkpoint as ckpt
from experiments import corpus as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    folder = root / "corpus"
    folder.mkdir()
    stdlib = C.load_corpus()
    for i, key in enumerate(stdlib.keys[:48]):
        (folder / f"doc_{i:02d}.txt").write_text(stdlib.read(key)[:4000], encoding="utf-8")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    tiny = [
        *("--corpus", str(folder), "--cache_dir", str(root / "cache")),
        *("--tokenizer", "bpe", "--vocab_size", "300"),
        *("--model.hidden_size", "32", "--model.intermediate_size", "64"),
        *("--model.num_layers", "1", "--model.num_heads", "2", "--model.num_kv_heads", "1"),
        *("--seq_len", "32", "--batch_size", "8", "--mesh", "data=2"),
        *("--eval_every", "5", "--eval_batches", "2", "--log_every", "5", "--no_progress"),
    ]
    return root, env, tiny


def _python(code: str, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _pretrain(
    argv: list[str],
    env,
    *,
    kill_after_checkpoint: int | None = None,
    kill_inside_checkpoint: int | None = None,
):
    hook = ""
    if kill_after_checkpoint is not None:
        # SIGKILL the process right after the checkpoint of that step is on disk.
        hook = (
            "import os, signal\n"
            "from experiments import checkpoint\n"
            "_save = checkpoint.save\n"
            "def save(d, step, *a, **k):\n"
            "    p = _save(d, step, *a, **k)\n"
            f"    if step == {kill_after_checkpoint}:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return p\n"
            "checkpoint.save = save\n"
        )
    if kill_inside_checkpoint is not None:
        # SIGKILL the process in the middle of writing that step's checkpoint:
        # the arrays and meta.json are on disk, the manifest is being hashed.
        hook = (
            "import os, signal\n"
            "from experiments import checkpoint\n"
            "_sha = checkpoint._sha256\n"
            "def _sha256(path):\n"
            f"    if '.tmp-step_{kill_inside_checkpoint:08d}' in str(path):\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return _sha(path)\n"
            "checkpoint._sha256 = _sha256\n"
        )
    code = hook + f"from experiments import pretrain\npretrain.main({argv!r})\n"
    return _python(code, env)


def _train_records(path):
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "train_loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r
    return out


def _sophia_args(tiny):
    # sophia_g: exercises refresh steps (k=3, phases straddle the kill) and the RNG.
    return [*tiny, "--opt", "sophia_g", "--opt.update_every", "3", "--steps", "20"]


@pytest.fixture(scope="module")
def straight(setup):
    """An uninterrupted 20-step run, the reference for the interrupted ones."""
    root, env, tiny = setup
    b = root / "straight"
    r = _pretrain([*_sophia_args(tiny), "--checkpoint_every", "20", "--out", str(b)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    return b


def _assert_same_final_checkpoint(a, b):
    got, meta_a = ckpt.read_arrays(a / "checkpoints" / "step_00000020")
    want, meta_b = ckpt.read_arrays(b / "checkpoints" / "step_00000020")
    assert meta_a["leaf_paths"] == meta_b["leaf_paths"]
    assert meta_a["data_position"] == meta_b["data_position"] == 20 * 8
    for name in ("params", "opt_state", "rng"):
        assert len(got[name]) == len(want[name]) > 0
        for x, y, path in zip(got[name], want[name], meta_a["leaf_paths"][name], strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y), f"{name}{path} differs"


@pytest.mark.slow  # ~35 s of CPU: three processes, the first compiles Sophia's two steps
def test_kill_and_resume_is_bit_exact(setup, straight):
    root, env, tiny = setup
    common = _sophia_args(tiny)
    a = root / "killed"

    killed = _pretrain(
        [*common, "--checkpoint_every", "10", "--out", str(a)], env, kill_after_checkpoint=10
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(a / "checkpoints")] == ["step_00000010"]

    resumed = _pretrain([*common, "--checkpoint_every", "10", "--out", str(a), "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_final_checkpoint(a, straight)
    # The interrupted run's log was cut at its checkpoint, so every step appears once.
    ra, rb = _train_records(a / "metrics.jsonl"), _train_records(straight / "metrics.jsonl")
    assert sorted(ra) == sorted(rb) == [5, 10, 15, 20]
    for s in ra:
        assert ra[s]["train_loss"] == rb[s]["train_loss"]


@pytest.mark.slow  # ~25 s of CPU: two processes
def test_kill_while_writing_checkpoint_resumes_from_last_complete(setup, straight):
    """Issue 9: SIGKILL mid-save; --resume uses the last complete checkpoint."""
    root, env, tiny = setup
    common = [*_sophia_args(tiny), "--checkpoint_every", "5"]
    a = root / "killed-mid-save"

    killed = _pretrain([*common, "--out", str(a)], env, kill_inside_checkpoint=15)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckdir = a / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(ckdir)] == ["step_00000005", "step_00000010"]
    assert (ckdir / ".tmp-step_00000015").is_dir()  # the half-written one, never renamed

    resumed = _pretrain([*common, "--out", str(a), "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000020" in [p.name for p in ckpt.list_checkpoints(ckdir)]
    _assert_same_final_checkpoint(a, straight)


def test_resume_without_checkpoint_fails_clearly(setup):
    root, env, tiny = setup
    r = _pretrain([*tiny, "--steps", "2", "--out", str(root / "nothing"), "--resume"], env)
    assert r.returncode != 0
    assert "CheckpointError: no checkpoint to resume from" in r.stderr


@pytest.mark.slow  # ~15 s of CPU: compiles two optimizers' steps
def test_ten_step_compare_writes_report_jsonl_and_plots(setup):
    root, env, tiny = setup
    out = root / "compare"
    argv = [*tiny, "--opts", "adamw,swan", "--steps", "10", "--out", str(out)]
    r = _python(f"from experiments import compare\ncompare.main({argv!r})\n", env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in r.stdout
    report = (out / "report.md").read_text()
    for name in ("adamw", "swan"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[4]) > 0  # val loss, bits/byte
    for png in ("loss_vs_tokens.png", "loss_vs_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name in ("adamw", "swan"):
        mine = [x for x in records if x["run"] == f"{name} seed=0"]
        assert [x["step"] for x in mine if "train_loss" in x] == [5, 10]
        assert [x["step"] for x in mine if "val_loss" in x] == [0, 5, 10]
        summary = mine[-1]["summary"]
        assert summary["steps"] == 10 and summary["opt_state_bytes"] > 0
        assert summary["peak_memory_bytes"] > 0 and summary["tokens_per_s"] > 0
        assert mine[-1]["summary"]["val_loss"] < mine[0]["val_loss"]  # it learned something
    results = json.loads((out / "results.json").read_text())
    assert [x["label"] for x in results["runs"]] == ["adamw", "swan"]


def test_metrics_writer_writes_on_process_zero_only(tmp_path, monkeypatch):
    import jax

    from experiments.train import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path, run="r")
    w.write({"step": 1, "loss": 2.0})
    w.close()
    assert json.loads(path.read_text())["loss"] == 2.0

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    other = tmp_path / "other.jsonl"
    w = MetricsWriter(other, run="r")
    w.write({"step": 1, "loss": 2.0})
    w.close()
    assert not other.exists()
