"""Command-line hyperparameters derived from signatures.

Optimizer flags come from the registry (`optim_transforms.hyperparameters`,
i.e. the factory signature), model flags from the `models.llama.LlamaConfig`
fields, so no default is restated here. Flags look like
``--opt.learning_rate 3e-3`` (or ``--opt.learning_rate=3e-3``); values are
Python literals (``0.9``, ``True``, ``(1e-30, 1e-16)``, ``'svd'``) or bare
strings.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from typing import Any

import optim_transforms as ot

__all__ = [
    "parse_value",
    "split_dotted_flags",
    "optimizer_hparams",
    "model_overrides",
    "load_json_arg",
]


def parse_value(text: Any, default: Any = inspect.Parameter.empty) -> Any:
    """Parses a flag value; coerced to the type of ``default`` where that is safe."""
    if not isinstance(text, str):
        value = text
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
    if isinstance(default, bool) and isinstance(value, str):
        low = value.lower()
        if low in ("true", "false"):
            return low == "true"
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def split_dotted_flags(argv: list[str], prefix: str) -> tuple[dict[str, str], list[str]]:
    """Pulls ``--PREFIX.KEY VALUE`` / ``--PREFIX.KEY=VALUE`` out of ``argv``.

    Returns:
      ``({KEY: VALUE}, remaining argv)``; KEY keeps inner dots (``swan.b1``).
    """
    flag = f"--{prefix}."
    found: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(flag):
            key = a[len(flag) :]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            else:
                raise ValueError(f"{a} needs a value")
            if not key:
                raise ValueError(f"{a}: empty hyperparameter name")
            found[key] = value
        else:
            rest.append(a)
        i += 1
    return found, rest


def load_json_arg(text: str | None) -> dict[str, Any]:
    """A JSON object given inline or as a path to a ``.json`` file; ``{}`` for None."""
    if not text:
        return {}
    if text.lstrip().startswith("{"):
        value = json.loads(text)
    else:
        with open(text) as f:
            value = json.load(f)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def optimizer_hparams(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Typed hyperparameters for optimizer ``name`` from raw flag values.

    Raises:
      ValueError: unknown optimizer (listing the valid ones) or unknown
        hyperparameter (listing the optimizer's hyperparameters).
    """
    valid = ot.hyperparameters(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        shown = ", ".join(
            k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in valid.items()
        )
        raise ValueError(
            f"optimizer {name!r}: unknown hyperparameter(s) {unknown}; valid ones: {shown}"
        )
    return {k: parse_value(v, valid[k]) for k, v in overrides.items()}


def model_overrides(config_cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """Typed `LlamaConfig` field overrides; unknown fields → ValueError listing them."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown model field(s) {unknown}; valid ones: {', '.join(sorted(fields))}"
        )
    out = {}
    for k, v in overrides.items():
        f = fields[k]
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is None and f.type in (int, "int"):
            default = 0
        out[k] = parse_value(v, default)
    return out
