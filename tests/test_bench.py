"""Benchmarks: the numbers they compute (no timing asserts)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optim_transforms
from experiments.bench import common, memory, planner, run, speed

F32 = 4


def _implemented(name):
    return common.try_build(name).ok


def test_memory_adamw_is_exactly_twice_the_params():
    tree = common.abstract_tree("llama-60m")
    row = memory.measure("adamw", tree)
    pbytes = common.tree_bytes(tree)
    assert (
        row["param_bytes"] == pbytes == 4 * sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    )
    assert row["formula_bytes"] == 2 * pbytes
    # the measured state is mu + nu plus a scalar int32 step counter
    state = jax.eval_shape(optim_transforms.build("adamw", learning_rate=1e-3).init, tree)
    scalars = sum(np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state) if x.shape == ())
    assert row["state_bytes"] - scalars == 2 * pbytes


def test_memory_formulas_on_one_matrix():
    kernel = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    tree = {"layers": {0: {"mlp": {"up_proj": {"kernel": kernel}}}}}
    m, n = 256, 64  # (out, in) of a Flax (in=64, out=256) kernel
    assert memory.formula_floats("swan", tree) == 0
    assert memory.formula_floats("apollo_mini", tree) == 2 * max(m, n) + min(m, n) + 1
    assert memory.formula_floats("came", tree) == m * n + 2 * (m + n)
    assert memory.formula_floats("lion", tree) == m * n


def test_memory_table_lists_every_optimizer_even_unavailable():
    res = memory.run(("llama-60m",))
    names = [r["optimizer"] for r in res["rows"]["llama-60m"]]
    assert names == optim_transforms.names()
    text = memory.to_markdown(res)
    for r in res["rows"]["llama-60m"]:
        assert r["optimizer"] in text
        assert (r["state_bytes"] is None) == (r["status"] != "ok")


def _leaf(p, kind, path):
    (x,) = [x for x in p.leaves if x.kind == kind and x.path == path]
    return x


def test_planner_adamw_llama7b_fsdp16_hand_computed():
    p = planner.plan("llama-7b", planner.parse_mesh("data,fsdp,tensor=1,16,1"), "adamw")
    # gate_proj kernel (4096, 11008): 'embed' -> fsdp on the 4096 axis, 'mlp' -> tensor (=1)
    gate = _leaf(p, "param", "layers/0/mlp/gate_proj/kernel")
    assert gate.global_bytes == 4096 * 11008 * F32
    assert gate.device_bytes == 4096 * 11008 * F32 // 16
    emb = _leaf(p, "param", "embed/embedding")
    assert emb.device_bytes == 32000 * 4096 * F32 // 16
    assert p.total("grad") == p.total("param")
    # mu and nu follow the param's sharding; the step counter is replicated
    mu = [
        x
        for x in p.leaves
        if x.kind == "state" and x.path.endswith("/layers/0/mlp/gate_proj/kernel")
    ]
    assert [x.device_bytes for x in mu] == [gate.device_bytes] * 2
    counters = sum(x.device_bytes for x in p.leaves if x.kind == "state" and x.shape == ())
    assert p.total("state") == 2 * p.total("param") + counters
    assert "per device" in planner.format_plan(p)


@pytest.mark.skipif(not _implemented("apollo_mini"), reason="apollo_mini not implemented yet")
def test_planner_apollo_mini_llama7b_fsdp16_hand_computed():
    p = planner.plan("llama-7b", planner.parse_mesh("data,fsdp,tensor=1,16,1"), "apollo_mini")
    gate = _leaf(p, "param", "layers/0/mlp/gate_proj/kernel")
    assert gate.device_bytes == 4096 * 11008 * F32 // 16
    # lm_head (4096, 32000) stays on AdamW: mu and nu sharded like the param
    head = [x for x in p.leaves if x.kind == "state" and x.path.endswith("lm_head/kernel")]
    assert [x.device_bytes for x in head] == [4096 * 32000 * F32 // 16] * 2
    # gate_proj: m = out = 11008 >= n = in = 4096, rank 1: at most 2*11008 + 4096 + 1 floats
    gate_state = sum(
        x.global_bytes
        for x in p.leaves
        if x.kind == "state" and "layers/0/mlp/gate_proj/kernel" in x.path
    )
    assert 0 < gate_state <= (2 * 11008 + 4096 + 1) * F32 + 64


def test_planner_rejects_bad_mesh():
    with pytest.raises(ValueError, match="mesh"):
        planner.parse_mesh("data,fsdp=1")
    with pytest.raises(ValueError, match="mesh"):
        planner.parse_mesh("data,pipeline=1,2")


TINY = {
    "embed": {"embedding": jax.ShapeDtypeStruct((64, 256), jnp.float32)},
    "layers": {
        0: {
            "attn": {"q_proj": {"kernel": jax.ShapeDtypeStruct((256, 512), jnp.float32)}},
            "attn_norm": {"scale": jax.ShapeDtypeStruct((256,), jnp.float32)},
        }
    },
    "lm_head": {"kernel": jax.ShapeDtypeStruct((256, 64), jnp.float32)},
}


def test_speed_harness_one_round_on_a_tiny_tree():
    shared = speed._Shared(speed.random_tree(TINY, 0), speed.random_tree(TINY, 1))
    cands = speed.jax_candidates(shared, TINY)
    res = speed.time_round_robin(cands, rounds=1, warmup=1)
    assert set(res) == {c.name for c in cands}
    for name in optim_transforms.names():
        assert name in res
    for name, r in res.items():
        if r["status"] == "ok":
            assert r["rounds"] == 1 and len(r["times"]) == 1 and r["median"] > 0, name
        else:  # not implemented / failed: listed with the reason, never timed
            assert r["times"] == [] and r["median"] is None and r["status"], name
    assert res["adamw"]["median"] is not None
    assert res["copy x*1.0000001"]["median"] is not None
    assert res[speed.APOLLO_MINI_ALL]["median"] is not None
    # the shared params went through every step and are still finite
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(shared.params))


def test_apollo_mini_all_row_routes_embedding_and_lm_head_to_apollo_mini():
    # The reference row differs from the registry default only in the routing
    # of the embedding and the LM head: low-rank moments instead of AdamW's.
    def low_rank(tx):
        state = jax.eval_shape(tx.init, TINY)
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
        return {p for p in paths if "['matrix']" in p and ".moments" in p and p.endswith(".mu")}

    default, every = (
        low_rank(common.try_build("apollo_mini").tx),
        low_rank(speed.apollo_mini_all().tx),
    )
    assert any("q_proj" in p for p in default), default
    assert not any("embed" in p or "lm_head" in p for p in default), default
    assert any("embed" in p for p in every) and any("lm_head" in p for p in every), every
    assert every - default == {p for p in every if "embed" in p or "lm_head" in p}
    assert default < every


def test_speed_torch_references_import_and_step():
    pytest.importorskip("torch")
    cands = speed.torch_candidates(TINY)
    names = {c.name for c in cands}
    assert {"torch AdamW foreach", "torch AdamW fused", "came-pytorch CAME"} <= names
    assert any(n.startswith("apollo-torch APOLLO") for n in names), names
    assert any(n.startswith("timm Lion") for n in names), names
    res = speed.time_round_robin(cands, rounds=1, warmup=1)
    failed = {n: r["status"] for n, r in res.items() if r["median"] is None}
    assert not failed


def test_apollo_torch_import_leaves_no_bitsandbytes_stand_in(monkeypatch):
    """The stand-in package is gone after the import: left in sys.modules it made
    pytorch-optimizer's ``find_spec("bitsandbytes")`` raise in a later test (CI)."""
    import importlib.util
    import sys

    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("apollo_torch") is None:
        pytest.skip("apollo-torch is not installed")
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed: no stand-in is needed")
    for name in [n for n in sys.modules if n.split(".")[0] in ("apollo_torch", "bitsandbytes")]:
        monkeypatch.delitem(sys.modules, name)  # import afresh; restored afterwards
    assert issubclass(speed.import_apollo_torch(), torch.optim.Optimizer)
    assert not [n for n in sys.modules if n.split(".")[0] == "bitsandbytes"]
    assert importlib.util.find_spec("bitsandbytes") is None


def test_speed_torch_setup_takes_the_state_allocating_step(monkeypatch):
    """The first PyTorch step allocates optimizer state, so setup takes it: the
    warm-up call (the one sample of a slow candidate in quick mode) is step 2."""
    torch = pytest.importorskip("torch")
    steps = []

    class Counting(torch.optim.AdamW):
        def step(self, closure=None):
            steps.append(len(self.state))  # parameters with state before this step
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Counting)
    cand = next(c for c in speed.torch_candidates(TINY) if c.name == "torch AdamW foreach")
    call = cand.setup()
    assert steps == [0]
    call()
    assert len(steps) == 2 and steps[1] == len(jax.tree.leaves(TINY)) > 0


def test_speed_layout_and_targets():
    assert speed.torch_layout((768, 2048), "layers/0/mlp/up_proj/kernel") == (2048, 768)
    assert speed.torch_layout((32000, 768), "embed/embedding") == (32000, 768)
    rows = {
        "adamw": {"median": 1.0, "ratio": 1.0},
        "cautious_adamw": {"median": 1.2, "ratio": 1.2},
        "came": {"median": 1.4, "ratio": 1.4},
        "swan": {"median": 3.0, "ratio": 3.0},
        "optax.contrib.muon (ns_steps=10)": {"median": 4.0, "ratio": 4.0},
    }
    v = run.check_targets(rows)
    assert v["cautious_adamw"] == "missed"
    assert v["came"] == "met"
    assert v["swan"].startswith("met")
    assert v["apollo"] == "not measured"


def test_only_keeps_other_sections_labelled_with_their_mode(tmp_path):
    import json

    path = tmp_path / "results.json"
    sections = {
        "speed": {"status": "failed: x", "seconds": 3.0},  # written before sections had a mode
        "peak": {"status": "failed: x", "seconds": 1.0, "mode": "full"},
    }
    path.write_text(json.dumps({"mode": "quick", "sections": sections}))
    kept = run._earlier_sections(path, keep={"speed", "peak"}, log=lambda s: None)
    assert kept == {"speed": {**sections["speed"], "mode": "quick"}, "peak": sections["peak"]}
    assert run._earlier_sections(path, keep={"memory"}, log=lambda s: None) == {}
    assert run._earlier_sections(tmp_path / "none.json", {"speed"}, lambda s: None) == {}
    page = run.render(
        {"memory": {"status": "failed: x", "seconds": 1.0, "mode": "full"}, **kept},
        {"machine": "m"},
        tmp_path / "B.md",
    )
    assert "`python -m experiments.bench` (full)" in page
    assert "`python -m experiments.bench --quick` (quick)" in page
    assert "*quick mode*" in page and "*full mode*" in page


def test_full_convergence_runs_only_optimizers_with_a_swept_rate(tmp_path):
    import json

    from experiments.bench import convergence

    table = {"learning_rates": {"adamw": 1e-3, "lion": 1e-4}, "source": {}}
    table["source"] = {"adamw": "measured 2026-11-23: best of ...", "lion": "prior: paper"}
    path = tmp_path / "lr.json"
    path.write_text(json.dumps(table))
    names, skipped = convergence.swept_names(path)
    assert names == ["adamw"]
    assert skipped["lion"] == "not run: learning rate not swept (prior: paper, lr.json)"
    assert set(skipped) | {"adamw"} == set(common.optimizer_names())


def test_convergence_command_on_the_page_has_no_absolute_path(tmp_path, monkeypatch):
    import subprocess
    import types

    from experiments.bench import convergence

    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        return types.SimpleNamespace(returncode=1, stderr="", stdout="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    res = convergence.run(tmp_path / "conv", quick=True)
    assert calls and str(tmp_path) in " ".join(calls[0])  # the real run writes there
    assert res["command"].startswith("python -m experiments.compare --opts ")
    words = res["command"].split()
    shown = words[words.index("--out") + 1]
    assert not shown.startswith("/") and shown.endswith("conv"), shown
