"""Tokenizers (byte-level BPE or raw bytes) and the tokenized-corpus cache.

The BPE is trained with `tokenizers` on the train split only, and both it and
the token streams are cached on disk under a key made of the corpus
fingerprint, the tokenizer kind and the vocabulary size, so a second run with
the same corpus starts at once.

Every document is followed by one end-of-text token. For bits per byte each
token counts the bytes it decodes to; the end-of-text token counts as one
byte (it stands for the document boundary, as a separator byte would).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable

import numpy as np

from experiments.corpus import Corpus

__all__ = [
    "EOT",
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "TokenizedCorpus",
    "cache_dir",
    "train_bpe",
    "get_tokenizer",
    "tokenize_corpus",
]

EOT = "<|endoftext|>"
_CACHE_VERSION = "1"


def cache_dir() -> pathlib.Path:
    """``$OPTIM_TRANSFORMS_CACHE`` or ``~/.cache/optim_transforms``."""
    d = os.environ.get("OPTIM_TRANSFORMS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "optim_transforms"
    )
    return pathlib.Path(d)


class Tokenizer:
    """Interface: ``encode``, ``decode``, ``vocab_size``, ``eot_id``, ``token_bytes``."""

    name: str
    vocab_size: int
    eot_id: int
    token_bytes: np.ndarray  # int32[vocab_size]: bytes each token decodes to

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0-255 are bytes, 256 is end-of-text."""

    def __init__(self):
        self.name = "bytes"
        self.vocab_size = 257
        self.eot_id = 256
        self.token_bytes = np.ones(self.vocab_size, np.int32)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style byte alphabet, no prefix space) from `tokenizers`."""

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(EOT)
        self.name = f"bpe{self.vocab_size}"
        # Byte-level BPE maps every byte to one character, so a token decodes
        # to as many bytes as its string has characters.
        lengths = np.zeros(self.vocab_size, np.int32)
        for token, i in tok.get_vocab().items():
            lengths[i] = 1 if token == EOT else len(token)
        self.token_bytes = lengths

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: pathlib.Path) -> None:
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: pathlib.Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Trains a byte-level BPE with ``vocab_size`` tokens (256 bytes + merges + EOT)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} must be >= 257 (256 bytes + end-of-text)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def _key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, (_CACHE_VERSION, *parts))).encode()).hexdigest()[:16]


def _atomic_write(path: pathlib.Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    os.close(fd)
    try:
        write(pathlib.Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def get_tokenizer(
    kind: str,
    corpus: Corpus,
    *,
    vocab_size: int = 2048,
    cache: pathlib.Path | None = None,
    fingerprint: str | None = None,
) -> Tokenizer:
    """``"bytes"`` or a ``"bpe"`` trained on ``corpus``'s train split (cached).

    Args:
      kind: ``"bpe"`` or ``"bytes"``.
      corpus: the corpus (its train split trains the BPE).
      vocab_size: BPE vocabulary size (ignored for bytes).
      cache: cache folder; default `cache_dir()`.
      fingerprint: ``corpus.fingerprint()`` if already computed.
    """
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"tokenizer={kind!r}; expected 'bpe' or 'bytes'")
    import tokenizers

    cache = cache or cache_dir()
    fingerprint = fingerprint or corpus.fingerprint()
    path = cache / f"bpe-{_key(fingerprint, vocab_size, tokenizers.__version__)}.json"
    if not path.exists():
        tok = train_bpe(corpus.documents("train"), vocab_size)
        _atomic_write(path, tok.save)
    return BPETokenizer.load(path)


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """Token streams of both splits (memory-mapped) and their byte counts."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    train_bytes: int
    val_bytes: int
    corpus_name: str
    fingerprint: str


def _encode_split(tok: Tokenizer, corpus: Corpus, split: str, path: pathlib.Path) -> dict:
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    n_tokens = n_bytes = 0

    def write(tmp: pathlib.Path) -> None:
        nonlocal n_tokens, n_bytes
        with open(tmp, "wb") as f:
            batch: list[str] = []

            def flush():
                nonlocal n_tokens, n_bytes
                for ids in tok.encode_batch(batch):
                    arr = np.asarray([*ids, tok.eot_id], dtype)
                    f.write(arr.tobytes())
                    n_tokens += arr.size
                n_bytes += sum(len(t.encode("utf-8")) + 1 for t in batch)
                batch.clear()

            for doc in corpus.documents(split):
                batch.append(doc)
                if len(batch) == 64:
                    flush()
            flush()

    _atomic_write(path, write)
    return {"tokens": n_tokens, "bytes": n_bytes, "dtype": np.dtype(dtype).name}


def tokenize_corpus(
    corpus: Corpus,
    kind: str = "bpe",
    *,
    vocab_size: int = 2048,
    cache: pathlib.Path | None = None,
) -> TokenizedCorpus:
    """Tokenizes both splits of ``corpus`` (cached) and memory-maps them."""
    cache = cache or cache_dir()
    fingerprint = corpus.fingerprint()
    tok = get_tokenizer(kind, corpus, vocab_size=vocab_size, cache=cache, fingerprint=fingerprint)
    key = _key(fingerprint, tok.name, kind)
    arrays, nbytes = {}, {}
    for split in ("train", "val"):
        data = cache / f"tokens-{key}-{split}.bin"
        meta_path = cache / f"tokens-{key}-{split}.json"
        if not (data.exists() and meta_path.exists()):
            meta = _encode_split(tok, corpus, split, data)
            _atomic_write(meta_path, lambda p, m=meta: p.write_text(json.dumps(m)))
        meta = json.loads(meta_path.read_text())
        if meta["tokens"] == 0:
            raise ValueError(f"corpus {corpus.name!r} has an empty {split} split")
        arrays[split] = np.memmap(data, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
        nbytes[split] = meta["bytes"]
    return TokenizedCorpus(
        tokenizer=tok,
        train=arrays["train"],
        val=arrays["val"],
        train_bytes=nbytes["train"],
        val_bytes=nbytes["val"],
        corpus_name=corpus.name,
        fingerprint=fingerprint,
    )
