"""Registry: names, hyperparameters read from signatures, clear errors."""

import inspect

import optax
import pytest

import optim_transforms as ot
from optim_transforms import registry

OURS = [
    "swan",
    "sophia_h",
    "sophia_g",
    "apollo",
    "apollo_mini",
    "came",
    "cautious_adamw",
    "cautious_lion",
]


def test_names_include_ours_and_baselines():
    assert set(OURS + ["adamw", "lion", "adafactor", "sgd"]) <= set(ot.names())
    assert ot.names() == sorted(ot.names())


def test_hyperparameters_come_from_signature():
    for name in ot.names():
        sig = inspect.signature(registry.factory(name))
        hp = ot.hyperparameters(name)
        assert list(hp) == [
            p for p in sig.parameters if sig.parameters[p].kind.name != "VAR_KEYWORD"
        ]
        for k, v in hp.items():
            assert v is sig.parameters[k].default
    assert ot.hyperparameters("adamw")["b2"] == 0.999
    assert ot.hyperparameters("adamw")["learning_rate"] is inspect.Parameter.empty


@pytest.mark.parametrize("name", OURS)
def test_every_named_optimizer_has_the_common_flags(name):
    hp = ot.hyperparameters(name)
    assert "learning_rate" in hp and hp["learning_rate"] is inspect.Parameter.empty
    if not name.startswith("cautious_"):  # C-AdamW / C-Lion are cautious by construction
        assert hp.get("cautious") is False, f"{name} must take cautious=False"
    # Off by default, as in optax: the check costs ~3x an AdamW update on CPU
    # (see optim_transforms.validate.finalize); training loops turn it on.
    assert hp.get("skip_nonfinite") is False, f"{name} must take skip_nonfinite=False"


def test_build_adamw_equals_optax():
    tx = ot.build("adamw", learning_rate=1e-3, weight_decay=0.0)
    assert isinstance(tx, optax.GradientTransformation)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'.*adamw.*swan"):
        ot.build("adamx", learning_rate=1e-3)


def test_unknown_hyperparameter_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['beta1'\].*b1"):
        ot.build("adamw", learning_rate=1e-3, beta1=0.9)


def test_missing_learning_rate():
    with pytest.raises(ValueError, match="missing required.*learning_rate"):
        ot.build("cautious_adamw")


def test_build_transform():
    tx = ot.build_transform("cautious_mask", ot.build_transform("scale_by_adam", b1=0.8))
    assert isinstance(tx, optax.GradientTransformation)
    with pytest.raises(ValueError, match="unknown transform 'wihten'.*whiten"):
        ot.build_transform("wihten")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        ot.build_transform("scale_by_adam", beta=0.9)


def test_optim_transforms_never_imports_flax():
    import subprocess
    import sys

    code = "import sys, optim_transforms; sys.exit('flax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
