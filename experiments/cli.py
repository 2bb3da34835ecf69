"""Flags shared by the CLIs: data, model and `TrainConfig`, derived from their definitions.

Every `experiments.train.TrainConfig` field is a flag with the field's
default (``--steps``, ``--batch_size``, ...); the model is ``--model NAME``
plus ``--model.FIELD VALUE`` for any `models.llama.LlamaConfig` field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import typing
from typing import Any

from experiments import hparams
from experiments.train import TrainConfig

__all__ = [
    "LR_TABLE_PATH",
    "load_lr_table",
    "add_common_flags",
    "parse_with_dotted",
    "train_config",
    "load_data",
    "enable_compile_cache",
]

LR_TABLE_PATH = pathlib.Path(__file__).with_name("lr_table.json")
_SKIP = {"model_overrides", "mesh", "progress"}


def load_lr_table(path: str | pathlib.Path | None = None) -> dict[str, float]:
    """``{optimizer: peak learning rate}`` from the committed table (or ``path``)."""
    table = json.loads(pathlib.Path(path or LR_TABLE_PATH).read_text())
    return {k: float(v) for k, v in table["learning_rates"].items()}


def _parse_mesh(text: str) -> tuple[int, int, int]:
    parts = [p for p in text.replace("x", ",").split(",") if p]
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    if all("=" in p for p in parts):
        for p in parts:
            k, v = p.split("=", 1)
            if k not in sizes:
                raise argparse.ArgumentTypeError(f"unknown mesh axis {k!r}; use data, fsdp, tensor")
            sizes[k] = int(v)
    elif len(parts) == 3:
        sizes = dict(zip(sizes, map(int, parts)))
    else:
        raise argparse.ArgumentTypeError(
            f"--mesh {text!r}: expected 'data=2,fsdp=4,tensor=1' or '2,4,1'"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def add_common_flags(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Adds data, model and `TrainConfig` flags; ``defaults`` overrides field defaults."""
    g = parser.add_argument_group("data")
    g.add_argument(
        "--corpus",
        default="stdlib",
        help="'stdlib' (the embedded CPython standard-library sources), a text file, a folder "
        "of text files, or a `datasets` dataset saved with save_to_disk",
    )
    g.add_argument("--text_column", default="text", help="text column of a `datasets` dataset")
    g.add_argument("--tokenizer", choices=("bpe", "bytes"), default="bpe")
    g.add_argument("--vocab_size", type=int, default=2048, help="BPE vocabulary size")
    g.add_argument("--cache_dir", default=None, help="tokenizer/token cache folder")
    g = parser.add_argument_group("model and training")
    g.add_argument(
        "--model",
        default="llama-1m",
        help="models.llama.CONFIGS name; --model.FIELD VALUE overrides",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIP or f.name == "model":
            continue
        default = defaults.get(f.name, f.default)
        kind = hints[f.name]
        g.add_argument(f"--{f.name}", type=kind, default=default, help=f"(default {default})")
    g.add_argument(
        "--mesh",
        type=_parse_mesh,
        default=None,
        help="mesh sizes 'data=D,fsdp=F,tensor=T' (default: every device on data)",
    )
    g.add_argument("--no_progress", action="store_true", help="no progress bar")


def parse_with_dotted(
    parser: argparse.ArgumentParser, argv: list[str] | None, prefixes: tuple[str, ...]
) -> tuple[argparse.Namespace, dict[str, dict[str, str]]]:
    """``parser.parse_args`` after pulling out ``--PREFIX.KEY VALUE`` flags for each prefix."""
    import sys

    rest = list(sys.argv[1:] if argv is None else argv)
    dotted = {}
    try:
        for p in prefixes:
            dotted[p], rest = hparams.split_dotted_flags(rest, p)
    except ValueError as e:
        parser.error(str(e))
    return parser.parse_args(rest), dotted


def train_config(args: argparse.Namespace, model_flags: dict[str, str]) -> TrainConfig:
    """The `TrainConfig` from parsed flags (model overrides typed from `LlamaConfig`)."""
    from models.llama import LlamaConfig

    overrides = hparams.model_overrides(LlamaConfig, model_flags)
    if "vocab_size" in overrides:
        raise ValueError("the vocabulary size comes from the tokenizer: use --vocab_size")
    kwargs = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in _SKIP
    }
    return TrainConfig(
        **kwargs, model_overrides=overrides, mesh=args.mesh, progress=not args.no_progress
    )


def load_data(args: argparse.Namespace):
    """Loads and tokenizes the corpus named by the flags (cached)."""
    from experiments.corpus import load_corpus
    from experiments.tokenizer import tokenize_corpus

    corpus = load_corpus(args.corpus, text_column=args.text_column)
    cache = pathlib.Path(args.cache_dir) if args.cache_dir else None
    return tokenize_corpus(corpus, args.tokenizer, vocab_size=args.vocab_size, cache=cache)


def enable_compile_cache(args: argparse.Namespace) -> None:
    """Turns on JAX's persistent compilation cache (``CACHE/jax-compile``).

    Reruns, extra seeds and resumed runs then skip XLA compilation. Left alone
    when ``JAX_COMPILATION_CACHE_DIR`` is set.
    """
    import os

    import jax

    from experiments.tokenizer import cache_dir

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    root = pathlib.Path(args.cache_dir) if args.cache_dir else cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(root / "jax-compile"))
