"""experiments: flags from signatures, chain specs, checkpoint files (no model needed)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optim_transforms as ot
from experiments import checkpoint as ckpt
from experiments import compare, hparams
from experiments.chain_spec import ChainSpecError, TransformCall, build_chain, parse_chain

# ---------------------------------------------------------------- flags


def test_flag_values_are_typed_from_the_signature_default():
    assert hparams.parse_value("3e-3", 1e-2) == 3e-3
    assert hparams.parse_value("1", 0.5) == 1.0 and isinstance(hparams.parse_value("1", 0.5), float)
    assert hparams.parse_value("false", True) is False
    assert hparams.parse_value("True", False) is True
    assert hparams.parse_value("[1e-30, 1e-3]", (1e-30, 1e-16)) == (1e-30, 1e-3)
    assert hparams.parse_value("svd", "newton_schulz") == "svd"
    assert hparams.parse_value("'svd'", "newton_schulz") == "svd"


def test_dotted_flags_are_split_out():
    found, rest = hparams.split_dotted_flags(
        ["--steps", "5", "--opt.b1=0.8", "--opt.swan.lr", "3", "--model.num_layers", "2"], "opt"
    )
    assert found == {"b1": "0.8", "swan.lr": "3"}
    assert rest == ["--steps", "5", "--model.num_layers", "2"]
    with pytest.raises(ValueError, match="needs a value"):
        hparams.split_dotted_flags(["--opt.b1"], "opt")


def test_optimizer_hyperparameters_come_from_the_registry():
    hp = hparams.optimizer_hparams("adamw", {"learning_rate": "1e-3", "b1": "0.8"})
    assert hp == {"learning_rate": 1e-3, "b1": 0.8}
    with pytest.raises(ValueError) as e:
        hparams.optimizer_hparams("adamw", {"bogus": "1"})
    msg = str(e.value)
    assert "bogus" in msg and all(k in msg for k in ot.hyperparameters("adamw"))
    with pytest.raises(ValueError, match="valid names"):
        hparams.optimizer_hparams("nope", {})


def test_model_flags_come_from_the_config_fields():
    from models.llama import LlamaConfig

    out = hparams.model_overrides(LlamaConfig, {"num_layers": "2", "scan_layers": "true"})
    assert out == {"num_layers": 2, "scan_layers": True}
    with pytest.raises(ValueError, match="hidden_size"):
        hparams.model_overrides(LlamaConfig, {"hiden_size": "3"})


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--opts", "adamw,nope"], "valid names"),
        (["--opts", "adamw", "--opt.adamw.bogus", "1"], "valid ones: learning_rate"),
        (["--opts", "adamw", "--opt.lion.b1", "0.9"], "not in --opts"),
        (["--opts", "adamw", "--opt.b1", "0.9"], "--opt.OPTIMIZER.HYPERPARAMETER"),
        (["--opts", "adamw", "--model.hiden_size", "3"], "unknown model field"),
    ],
)
def test_compare_rejects_bad_flags_before_any_work(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        compare.main([*argv, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_default_comparison_lists_the_issue_optimizers_with_learning_rates():
    from experiments.cli import load_lr_table

    assert compare.DEFAULT_OPTIMIZERS == (
        "adamw",
        "swan",
        "sophia_g",
        "apollo_mini",
        "cautious_adamw",
        "came",
    )
    table = load_lr_table()
    assert set(compare.DEFAULT_OPTIMIZERS) <= set(table) <= set(ot.names())
    assert all(lr > 0 for lr in table.values())


# ---------------------------------------------------------------- chain specs


def test_chain_spec_parses_nested_transforms_and_literals():
    calls = parse_chain("grad_norm, cautious_mask(scale_by_adam(b1=0.8)), scale(-1e-3)")
    assert calls == [
        TransformCall("grad_norm"),
        TransformCall("cautious_mask", (TransformCall("scale_by_adam", (), {"b1": 0.8}),)),
        TransformCall("scale", (-1e-3,)),
    ]
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    grads = jax.tree.map(lambda x: 0.1 * x, params)
    tx = build_chain("cautious_mask(scale_by_adam(b1=0.8)),scale(-1e-3)")
    ref = optax.chain(ot.cautious_mask(optax.scale_by_adam(b1=0.8)), optax.scale(-1e-3))
    u, _ = tx.update(grads, tx.init(params), params)
    v, _ = ref.update(grads, ref.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, u, v)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("grad_norm,foo,scale(-1)", r"unknown transform 'foo'; valid transforms: .*whiten"),
        ("cautious_mask(scale_by_adamm)", "unknown transform 'scale_by_adamm'"),
        ("whiten(method=svd)", "needs quotes"),
        ("scale_by_adam(b3=0.9)", r"bad arguments for 'scale_by_adam'.*valid ones: b1, b2"),
        ("scale(1, 2)", "bad arguments for 'scale'"),
        ("scale(-1e-3", "does not parse"),
        ("scale(x + 1)", "neither a literal nor a transform"),
        ("scale(-1e-3)[0]", "expected a transform name or call"),
        ("", "empty chain spec"),
    ],
)
def test_chain_spec_errors_are_clear(spec, match):
    with pytest.raises(ChainSpecError, match=match):
        build_chain(spec)


def test_chain_spec_error_is_a_value_error_raised_by_ordering_before_training(tmp_path):
    from experiments import ordering

    with pytest.raises(ValueError, match="unknown transform 'nope'"):
        ordering.main(["scale_by_adam,scale(-1e-2)", "nope", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- checkpoints


def _trees(mesh, scale=1.0):
    w = jax.device_put(scale * jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data", None)))
    return {
        "params": {"w": w, "b": (scale * jnp.ones(3),)},
        "opt_state": (optax.ScaleByAdamState(jnp.int32(7), {"w": w}, {"w": w * w}),),
        "rng": jax.random.key(int(scale)),
    }


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_checkpoint_round_trip_is_bit_exact_with_shardings(tmp_path, mesh):
    trees = _trees(mesh, 3.0)
    ckpt.save(tmp_path, 10, trees, {"data_position": 320})
    out, meta = ckpt.restore(tmp_path, _trees(mesh, 0.0))
    assert meta["step"] == 10 and meta["data_position"] == 320
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(trees), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.dtype == b.dtype
    assert out["params"]["w"].sharding.is_equivalent_to(trees["params"]["w"].sharding, 2)
    arrays, meta2 = ckpt.read_arrays(tmp_path / "step_00000010")
    assert meta2["leaf_paths"]["params"] == ["['b'][0]", "['w']"]
    np.testing.assert_array_equal(arrays["params"][1], np.asarray(trees["params"]["w"]))


def test_keeps_only_the_latest_checkpoints(tmp_path, mesh):
    for step in (10, 20, 30):
        ckpt.save(tmp_path, step, _trees(mesh), {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000020", "step_00000030"]


def test_missing_checkpoint_gives_a_clear_error(tmp_path, mesh):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint to resume from"):
        ckpt.restore(tmp_path / "absent", _trees(mesh))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint to resume from"):
        ckpt.restore(tmp_path / "empty", _trees(mesh))


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, mesh):
    path = ckpt.save(tmp_path, 10, _trees(mesh), {})
    data_files = [p for p in (path / "arrays").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert data_files
    with open(data_files[0], "r+b") as f:  # flip bytes in an array chunk
        f.seek(max(0, os.path.getsize(data_files[0]) // 2))
        f.write(b"\xde\xad\xbe\xef")
    with pytest.raises(ckpt.CheckpointError, match="corrupt: sha256 mismatch"):
        ckpt.restore(tmp_path, _trees(mesh))
    data_files[0].unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete: missing files"):
        ckpt.restore(tmp_path, _trees(mesh))
    (path / "MANIFEST.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete: MANIFEST.json is missing"):
        ckpt.restore(tmp_path, _trees(mesh))


def test_checkpoint_from_another_model_is_rejected(tmp_path, mesh):
    ckpt.save(tmp_path, 10, _trees(mesh), {})
    other = _trees(mesh)
    other["params"]["extra"] = jnp.zeros(2)
    with pytest.raises(ckpt.CheckpointError, match="different trees"):
        ckpt.restore(tmp_path, other)


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, mesh, monkeypatch):
    good = ckpt.save(tmp_path, 10, _trees(mesh, 2.0), {"data_position": 1})
    before = {p: p.read_bytes() for p in good.rglob("*") if p.is_file()}
    real = json.dumps

    def crash_while_writing_meta(obj, *a, **k):  # the arrays are written by now
        if isinstance(obj, dict) and "leaf_paths" in obj:
            raise KeyboardInterrupt("killed mid-save")
        return real(obj, *a, **k)

    monkeypatch.setattr(ckpt.json, "dumps", crash_while_writing_meta)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, 20, _trees(mesh, 5.0), {"data_position": 2})
    with pytest.raises(KeyboardInterrupt):  # re-saving an existing step is atomic too
        ckpt.save(tmp_path, 10, _trees(mesh, 5.0), {"data_position": 2})
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000010"]
    assert {p: p.read_bytes() for p in good.rglob("*") if p.is_file()} == before
    out, meta = ckpt.restore(tmp_path, _trees(mesh))
    assert meta["data_position"] == 1
    np.testing.assert_array_equal(np.asarray(out["params"]["b"][0]), 2.0 * np.ones(3))
    ckpt.save(tmp_path, 20, _trees(mesh, 5.0), {"data_position": 2})  # stale temp is replaced
    assert ckpt.restore(tmp_path, _trees(mesh))[1]["data_position"] == 2
