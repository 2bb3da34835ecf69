"""Text corpora with a fixed train/validation split.

The default corpus is the CPython standard library's ``.py`` sources that ship
with the interpreter running this code (found with `sysconfig`), so a fresh
machine needs no download. A real corpus is a text file, a folder of text
files, or a Hugging Face `datasets` dataset saved with ``save_to_disk``.

A corpus is a sequence of documents, each with a stable key (relative path,
block index, record index). A document goes to the validation split iff
``sha256(key) % VAL_MODULUS == 0``: the split is deterministic, disjoint, and
a document never changes side when others are added or removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import platform
import sysconfig
from collections.abc import Callable, Iterator

__all__ = [
    "Corpus",
    "VAL_MODULUS",
    "STDLIB_EXCLUDED_DIRS",
    "stdlib_corpus",
    "load_corpus",
    "in_validation",
]

VAL_MODULUS = 16  # 1/16 of the documents go to the validation split.

# Left out of the default corpus: folders that Linux distributions ship as
# separate packages (so they are not on every machine: Debian's
# libpython3-testsuite, python3-tk, idle, python3-lib2to3, python3-distutils,
# python3-venv), third-party packages, and the codec tables in `encodings`
# (1.4 MB of generated hex literals that would dominate the loss).
STDLIB_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "distutils",
        "ensurepip",
        "encodings",
    }
)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".json", ".jsonl", ".csv", ".tex")
LINES_PER_BLOCK = 200  # a single text file is cut into documents of this many lines


def in_validation(key: str) -> bool:
    """Whether the document with stable ``key`` belongs to the validation split."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h % VAL_MODULUS == 0


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents with a fixed split.

    Attributes:
      name: human-readable description (shown in reports).
      keys: stable document keys, in a fixed (sorted) order.
      read: reads the document with a given key as text.
    """

    name: str
    keys: tuple[str, ...]
    read: Callable[[str], str]

    def split_keys(self, split: str) -> list[str]:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; expected 'train' or 'val'")
        want_val = split == "val"
        return [k for k in self.keys if in_validation(k) == want_val]

    def documents(self, split: str) -> Iterator[str]:
        """Streams the documents of ``split`` ('train' or 'val') in key order."""
        for k in self.split_keys(split):
            yield self.read(k)

    def fingerprint(self) -> str:
        """sha256 over every key and document (identifies caches built from it)."""
        h = hashlib.sha256(self.name.encode())
        for k in self.keys:
            text = self.read(k)
            h.update(k.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
        return h.hexdigest()

    def num_bytes(self, split: str | None = None) -> int:
        keys = self.keys if split is None else self.split_keys(split)
        return sum(len(self.read(k).encode("utf-8")) for k in keys)


def _read_utf8(path: pathlib.Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def _folder_corpus(
    root: pathlib.Path,
    name: str,
    accept: Callable[[pathlib.Path], bool],
    prune: frozenset[str] = frozenset(),
) -> Corpus:
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in prune]
        for f in filenames:
            p = pathlib.Path(dirpath, f)
            rel = p.relative_to(root)
            if accept(rel) and _read_utf8(p) is not None:
                files[rel.as_posix()] = p
    if not files:
        raise ValueError(f"no UTF-8 text files found under {root}")
    files = dict(sorted(files.items()))

    def read(key: str) -> str:
        return files[key].read_bytes().decode("utf-8")

    return Corpus(name=name, keys=tuple(files), read=read)


def stdlib_corpus() -> Corpus:
    """The CPython standard-library ``.py`` sources of this interpreter.

    Excludes `STDLIB_EXCLUDED_DIRS` and the machine-specific
    ``_sysconfigdata*`` module; files that are not UTF-8 are skipped.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])

    def accept(rel: pathlib.Path) -> bool:
        return rel.suffix == ".py" and not rel.name.startswith("_sysconfigdata")

    name = f"cpython-{platform.python_version()}-stdlib"
    return _folder_corpus(root, name, accept, prune=STDLIB_EXCLUDED_DIRS)


def _text_file_corpus(path: pathlib.Path) -> Corpus:
    text = _read_utf8(path)
    if text is None:
        raise ValueError(f"{path} is not UTF-8 text")
    lines = text.splitlines(keepends=True)
    blocks = {
        f"{i:08d}": "".join(lines[j : j + LINES_PER_BLOCK])
        for i, j in enumerate(range(0, len(lines), LINES_PER_BLOCK))
    }
    return Corpus(name=f"file:{path.name}", keys=tuple(blocks), read=blocks.__getitem__)


def _is_datasets_dir(path: pathlib.Path) -> bool:
    return any(
        (path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")
    )


def _datasets_corpus(path: pathlib.Path, text_column: str) -> Corpus:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"{path} looks like a Hugging Face `datasets` dataset (saved with save_to_disk); "
            "reading it needs the `datasets` package: pip install datasets"
        ) from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        # The split is ours (by record hash) so that val never overlaps train.
        parts = [(s, ds[s]) for s in sorted(ds)]
    else:
        parts = [("data", ds)]
    for _, d in parts:
        if text_column not in d.column_names:
            raise ValueError(
                f"dataset at {path} has no column {text_column!r}; columns: {d.column_names}"
            )
    keys = tuple(f"{s}/{i:010d}" for s, d in parts for i in range(len(d)))
    tables = dict(parts)

    def read(key: str) -> str:
        s, i = key.rsplit("/", 1)
        return tables[s][int(i)][text_column]

    return Corpus(name=f"datasets:{path.name}", keys=keys, read=read)


def load_corpus(spec: str | None = None, *, text_column: str = "text") -> Corpus:
    """The corpus named by ``spec``.

    Args:
      spec: ``None`` or ``"stdlib"`` for the embedded default; a path to a text
        file; a folder of text files (suffixes in `TEXT_SUFFIXES`, recursively);
        or a folder written by `datasets`' ``save_to_disk``.
      text_column: the text column of a `datasets` dataset.

    Returns:
      A `Corpus`.
    """
    if spec is None or spec == "stdlib":
        return stdlib_corpus()
    path = pathlib.Path(os.path.expanduser(spec))
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {spec!r} not found; give 'stdlib', a text file, a folder of text "
            "files, or a `datasets` dataset saved with save_to_disk"
        )
    if path.is_file():
        return _text_file_corpus(path)
    if _is_datasets_dir(path):
        return _datasets_corpus(path, text_column)
    return _folder_corpus(path, f"folder:{path.name}", lambda rel: rel.suffix in TEXT_SUFFIXES)
