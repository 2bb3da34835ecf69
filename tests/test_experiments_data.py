"""experiments: corpus split, tokenizers, batch iteration (no model needed)."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from experiments import corpus as C
from experiments import data as D
from experiments import tokenizer as T


@pytest.fixture(scope="module")
def stdlib():
    return C.load_corpus()


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, stdlib):
    """48 short documents cut from the standard library, plus unicode text."""
    root = tmp_path_factory.mktemp("corpus")
    for i, key in enumerate(stdlib.keys[:48]):
        (root / f"doc_{i:02d}.txt").write_text(stdlib.read(key)[:3000], encoding="utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "unicode.md").write_text("Grüße, 世界! ∑ x² 🙂\n\ttabs  and  spaces\n")
    (root / "binary.bin").write_bytes(b"\x00\xff not text")  # wrong suffix: ignored
    return root


def test_stdlib_corpus_split_is_deterministic_and_disjoint(stdlib):
    again = C.load_corpus("stdlib")
    assert again.keys == stdlib.keys and again.fingerprint() == stdlib.fingerprint()
    train, val = set(stdlib.split_keys("train")), set(stdlib.split_keys("val"))
    assert train and val and not train & val
    assert train | val == set(stdlib.keys)
    assert val == set(again.split_keys("val"))
    # ~1/VAL_MODULUS of the files, by hash of the relative path.
    assert 0.5 / C.VAL_MODULUS < len(val) / len(stdlib.keys) < 2.0 / C.VAL_MODULUS
    for key in stdlib.keys:
        parts = key.split("/")
        assert key.endswith(".py") and not set(parts[:-1]) & C.STDLIB_EXCLUDED_DIRS
        assert not parts[-1].startswith("_sysconfigdata")
    assert list(stdlib.keys) == sorted(stdlib.keys)
    assert stdlib.num_bytes() > 1_000_000  # megabytes of real text, no download


def test_split_of_a_document_does_not_depend_on_the_others(small_folder, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(small_folder, folder)
    a = C.load_corpus(str(folder))
    assert "sub/unicode.md" in a.keys and "binary.bin" not in a.keys
    for i in range(5):
        (folder / f"extra_{i}.txt").write_text(f"extra {i}\n")
    b = C.load_corpus(str(folder))
    assert set(a.split_keys("val")) <= set(b.split_keys("val"))
    assert set(a.split_keys("train")) <= set(b.split_keys("train"))
    assert a.fingerprint() != b.fingerprint()


def test_text_file_is_cut_into_blocks(tmp_path):
    path = tmp_path / "book.txt"
    lines = [f"line {i}\n" for i in range(C.LINES_PER_BLOCK * 40 + 7)]
    path.write_text("".join(lines))
    c = C.load_corpus(str(path))
    assert len(c.keys) == 41
    assert "".join(c.read(k) for k in c.keys) == "".join(lines)
    assert c.split_keys("val") and not set(c.split_keys("val")) & set(c.split_keys("train"))


def test_missing_corpus_and_missing_datasets_package_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        C.load_corpus(str(tmp_path / "nope"))
    ds = tmp_path / "hf"
    ds.mkdir()
    (ds / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without it
    with pytest.raises(ImportError, match="pip install datasets"):
        C.load_corpus(str(ds))


ROUND_TRIP = [
    "def f(x):\n    return x ** 2  # comment\n",
    "Grüße, 世界! ∑ x² 🙂\n\ttabs  and  spaces\n",
    "",
    "   leading spaces and trailing   ",
    "\x00\x01 control \r\n windows newline",
]


@pytest.fixture(scope="module")
def bpe(small_folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    c = C.load_corpus(str(small_folder))
    return T.get_tokenizer("bpe", c, vocab_size=300, cache=cache), c, cache


def test_bpe_round_trips_and_counts_bytes(bpe):
    tok, c, _ = bpe
    assert tok.vocab_size == 300
    assert tok.decode([tok.eot_id]) == ""
    for text in ROUND_TRIP + [c.read(k) for k in c.keys[:5]]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    long = c.read(c.keys[0])
    assert len(tok.encode(long)) < 0.8 * len(long.encode())  # merges were learned


def test_bpe_is_cached_by_corpus_and_vocab(bpe, small_folder):
    tok, c, cache = bpe
    files = sorted(cache.glob("bpe-*.json"))
    assert len(files) == 1
    again = T.get_tokenizer("bpe", c, vocab_size=300, cache=cache)
    assert sorted(cache.glob("bpe-*.json")) == files
    assert again.encode(ROUND_TRIP[0]) == tok.encode(ROUND_TRIP[0])
    T.get_tokenizer("bpe", c, vocab_size=280, cache=cache)
    assert len(list(cache.glob("bpe-*.json"))) == 2


def test_byte_tokenizer_round_trips():
    tok = T.ByteTokenizer()
    for text in ROUND_TRIP:
        ids = tok.encode(text)
        assert max(ids, default=0) < 256 and tok.decode(ids) == text
    assert tok.vocab_size == 257 and tok.eot_id == 256


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_tokenized_corpus_matches_the_split(bpe, kind):
    _, c, cache = bpe
    tc = T.tokenize_corpus(c, kind, vocab_size=300, cache=cache)
    for split, tokens, nbytes in (
        ("train", tc.train, tc.train_bytes),
        ("val", tc.val, tc.val_bytes),
    ):
        docs = list(c.documents(split))
        assert int(tc.tokenizer.token_bytes[tokens].sum()) == nbytes
        assert nbytes == sum(len(d.encode()) + 1 for d in docs)  # + 1 end-of-text per document
        assert int((tokens == tc.tokenizer.eot_id).sum()) == len(docs)
    first_doc = next(c.documents("train"))
    n = len(tc.tokenizer.encode(first_doc))
    assert tc.tokenizer.decode(tc.train[:n]) == first_doc
    again = T.tokenize_corpus(c, kind, vocab_size=300, cache=cache)  # from the cache
    np.testing.assert_array_equal(again.train, tc.train)


def test_train_batches_are_deterministic_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    it = D.TrainBatches(tokens, seq_len=16, batch_size=8, seed=3)
    assert it.n == (1000 - 1) // 16
    batches = [next(it) for _ in range(20)]  # 160 windows: crosses two epoch boundaries
    assert it.position == 160
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (8, 16) and b["inputs"].dtype == np.int32
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
        assert np.all(b["inputs"][:, 0] % 16 == 0)  # windows start on the grid
    first_epoch = np.concatenate([b["inputs"][:, 0] for b in batches])[: it.n] // 16
    assert sorted(first_epoch) == list(range(it.n))  # every window once per epoch
    resumed = D.TrainBatches(tokens, seq_len=16, batch_size=8, seed=3, position=7 * 8)
    for b in batches[7:]:
        r = next(resumed)
        np.testing.assert_array_equal(r["inputs"], b["inputs"])
    other = next(D.TrainBatches(tokens, seq_len=16, batch_size=8, seed=4))
    assert not np.array_equal(other["inputs"], batches[0]["inputs"])


def test_eval_batches_are_the_first_windows_in_order():
    tokens = np.arange(300, dtype=np.uint16)
    ev = D.eval_batches(tokens, seq_len=10, batch_size=4, num_batches=100)
    assert len(ev) == (299 // 10) // 4
    np.testing.assert_array_equal(ev[0]["inputs"][1], np.arange(10, 20))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        D.eval_batches(tokens[:20], seq_len=10, batch_size=4, num_batches=1)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        D.TrainBatches(tokens[:20], seq_len=10, batch_size=4, seed=0)
