"""Shared pieces of the benchmarks: model trees, optimizers by name, machine info.

The LLaMA param trees come from `models` (``abstract_params``, no allocation)
when it is importable; otherwise from the shapes fixed by the models contract
(same paths, same Flax ``(in, out)`` layout), so the benchmarks run before and
after `models` lands and switch over automatically.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import pathlib
import platform
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optim_transforms

# The project root (BENCHMARKS.md, benchmarks/); the page shows paths relative to it.
ROOT = pathlib.Path(__file__).resolve().parents[2]

__all__ = [
    "MODEL_SIZES",
    "Available",
    "abstract_tree",
    "tree_source",
    "optimizer_names",
    "try_build",
    "tree_bytes",
    "machine_info",
    "fmt_bytes",
]

# Paper sizes (GaLore/APOLLO LLaMA configs) and the tiny CPU model, as in the
# models contract: hidden, intermediate, heads, layers, kv heads, vocab.
_FALLBACK = {
    "llama-1m": (128, 352, 4, 4, 2, 2048),
    "llama-60m": (512, 1376, 8, 8, 8, 32000),
    "llama-130m": (768, 2048, 12, 12, 12, 32000),
    "llama-350m": (1024, 2736, 16, 24, 16, 32000),
    "llama-1b": (2048, 5461, 32, 24, 32, 32000),
    "llama-7b": (4096, 11008, 32, 32, 32, 32000),
}
MODEL_SIZES = ("llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b")


def _models_available() -> bool:
    try:
        import models.llama  # noqa: F401
        import models.sharding  # noqa: F401
    except ImportError:
        return False
    import models.llama as ml
    import models.sharding as ms

    return hasattr(ml, "get_config") and hasattr(ms, "abstract_params")


def tree_source() -> str:
    """Where `abstract_tree` takes its trees from (stated on the results page)."""
    if _models_available():
        return "models.sharding.abstract_params"
    return "shapes from the models contract (models/ not importable)"


def _fallback_tree(name: str, dtype: Any) -> dict:
    d, inter, heads, layers, kv, vocab = _FALLBACK[name]
    hd = d // heads

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    def layer():
        return {
            "attn": {
                "q_proj": {"kernel": s(d, heads * hd)},
                "k_proj": {"kernel": s(d, kv * hd)},
                "v_proj": {"kernel": s(d, kv * hd)},
                "o_proj": {"kernel": s(heads * hd, d)},
            },
            "mlp": {
                "gate_proj": {"kernel": s(d, inter)},
                "up_proj": {"kernel": s(d, inter)},
                "down_proj": {"kernel": s(inter, d)},
            },
            "attn_norm": {"scale": s(d)},
            "mlp_norm": {"scale": s(d)},
        }

    return {
        "embed": {"embedding": s(vocab, d)},
        "layers": {i: layer() for i in range(layers)},
        "norm": {"scale": s(d)},
        "lm_head": {"kernel": s(d, vocab)},
    }


def _pure(tree: Any) -> Any:
    """An `nnx.State` as a plain nested dict (same key paths); anything else as is."""
    try:
        from flax import nnx
    except ImportError:
        return tree
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    return tree


def abstract_tree(name: str, mesh: Any = None, *, param_dtype: str | None = None) -> Any:
    """The param tree of LLaMA config ``name`` as `jax.ShapeDtypeStruct`s.

    With `models` importable this is ``models.sharding.abstract_params`` (on
    ``mesh``, default a 1-device mesh; leaves carry `NamedSharding`s), else the
    contract's shapes without shardings. No array is allocated.
    """
    if _models_available():
        from models.llama import get_config
        from models.sharding import abstract_params, make_mesh

        overrides = {"param_dtype": param_dtype} if param_dtype else {}
        config = get_config(name, **overrides)
        if mesh is None:
            mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        return _pure(abstract_params(config, mesh))
    if mesh is not None:
        raise RuntimeError("sharded trees need models.sharding, which is not importable yet")
    return _fallback_tree(name, jnp.dtype(param_dtype or "float32"))


def optimizer_names() -> list[str]:
    """Every optimizer in the registry (implemented or not)."""
    return list(optim_transforms.names())


@dataclasses.dataclass
class Available:
    """An optimizer built by name, or why it could not be."""

    name: str
    tx: Any = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.tx is not None


def try_build(name: str, learning_rate: float = 1e-3, **hparams: Any) -> Available:
    """``optim_transforms.build(name, ...)``; a placeholder gives ``tx=None`` and the reason."""
    try:
        return Available(name, optim_transforms.build(name, learning_rate=learning_rate, **hparams))
    except NotImplementedError as e:
        return Available(name, None, f"not available (not implemented yet: {e})")
    except Exception as e:  # a half-landed optimizer must not stop the benchmarks
        return Available(name, None, f"not available ({type(e).__name__}: {e})")


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree`` (arrays or ShapeDtypeStructs)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            total += math.prod(x.shape) * np.dtype(x.dtype).itemsize
    return total


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """CPU model, cores, load, versions and the date: the page's header."""
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "load average (1, 5, 15 min) at start": load,
        "jax backend": f"{jax.default_backend()} ({jax.device_count()} device(s))",
        "versions": f"python {platform.python_version()}, jax {jax.__version__}, "
        f"optax {__import__('optax').__version__}, torch {torch_version}",
    }


def fmt_bytes(n: float) -> str:
    """Bytes in binary units (``1.50 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def slug(path: Any) -> str:
    """A key path as ``'a/b/0/kernel'``."""
    return optim_transforms.matrix.path_names(path)


def is_excluded(name: str) -> bool:
    """Embeddings and LM head: matrices the matrix optimizers leave to AdamW."""
    return re.search(optim_transforms.matrix.EXCLUDE_FROM_MATRIX, name) is not None
