"""pydoc_data.topics corpus: fixed split, determinism, shapes, vocabulary, padding."""

from __future__ import annotations

import zlib
from pydoc_data.topics import topics

import pytest
import torch

from curvlab.data import (
    decode_tokens,
    encode_text,
    load_pydoc_topics,
    pydoc_topics,
    text_vocabulary,
)


def test_split_is_fixed_by_topic_name_and_disjoint():
    train, val = pydoc_topics()
    assert set(train) | set(val) == set(topics) and not set(train) & set(val)
    assert val == sorted(t for t in topics if zlib.crc32(t.encode()) % 10 == 0)
    assert train == sorted(train)
    # the split of this Python's topics (documents are assigned by name alone)
    assert {"attribute-access", "context-managers", "floating"} <= set(val)
    assert len(pydoc_topics(0.3)[1]) > len(val)


@pytest.mark.parametrize("level", ["byte", "char"])
def test_deterministic_shapes_and_next_token_targets(level):
    a = load_pydoc_topics(16, level=level)
    b = load_pydoc_topics(16, level=level)
    for x, y in (a.train, a.test):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == 16
        assert torch.equal(x[:, 1:], y[:, :-1])          # targets are inputs shifted by one
        assert torch.equal(x[1:, 0], y[:-1, -1])         # windows tile one stream
        assert int(x.min()) >= 0 and int(y.max()) < a.num_classes
    for t1, t2 in zip((*a.train, *a.test), (*b.train, *b.test)):
        assert torch.equal(t1, t2)
    assert a.input_shape == (16,) and a.task == "classification"
    assert a.num_test < 0.2 * a.num_train


def test_windows_cover_the_stream_and_decode_back():
    ds = load_pydoc_topics(32)
    train, _ = pydoc_topics()
    stream = "".join(topics[t] + "\n\n" for t in train).encode()
    n = (len(stream) - 1) // 32
    assert ds.num_train == n
    assert bytes(ds.x_train[:3].reshape(-1).tolist()) == stream[:96]
    assert decode_tokens(ds.x_train[0]) == stream[:32].decode()


def test_vocabulary():
    assert load_pydoc_topics(8).num_classes == 256
    vocab = text_vocabulary("char")
    assert text_vocabulary("byte") is None
    assert list(vocab) == sorted(set(vocab)) and "\n" in vocab and " " in vocab
    all_text = "".join(topics.values())
    assert set(all_text) <= set(vocab)
    ds = load_pydoc_topics(8, level="char")
    assert ds.num_classes == len(vocab)
    text = "def f(x): return x ** 2"
    assert decode_tokens(encode_text(text, "char"), "char") == text
    assert encode_text("hé").tolist() == [104, 195, 169]
    with pytest.raises(KeyError, match="not in the vocabulary"):
        encode_text("\u2603", "char")


def test_padding_marks_document_tails_with_ignore_index():
    ds = load_pydoc_topics(64, pad=True, pad_token=3)
    plain = load_pydoc_topics(64)
    x, y = ds.train
    padded = (y == -100).any(dim=1)
    train, _ = pydoc_topics()
    assert int(padded.sum()) == sum(
        (len((topics[t] + "\n\n").encode()) - 1) % 64 > 0 for t in train)
    for row in torch.nonzero(padded).flatten()[:5].tolist():
        n = int((y[row] != -100).sum())
        assert (y[row, n:] == -100).all() and (x[row, n:] == 3).all()   # padding is a tail
        assert torch.equal(x[row, 1:n], y[row, : n - 1])
    assert ds.num_train >= plain.num_train
    # cross-entropy skips the padded positions
    logits = torch.randn(x.shape[0], 256, 64)
    keep = y != -100
    ce = torch.nn.CrossEntropyLoss()(logits[:50], y[:50])
    manual = torch.nn.functional.cross_entropy(
        logits[:50].transpose(1, 2)[keep[:50]], y[:50][keep[:50]])
    torch.testing.assert_close(ce, manual)
    custom = load_pydoc_topics(64, pad=True, ignore_index=-1)
    assert int((custom.y_train == -1).sum()) == int((y == -100).sum())


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="level"):
        load_pydoc_topics(8, level="word")
    with pytest.raises(ValueError, match="context"):
        load_pydoc_topics(0)
    with pytest.raises(ValueError, match="ignore_index"):
        load_pydoc_topics(8, ignore_index=5)
    with pytest.raises(ValueError, match="pad_token"):
        load_pydoc_topics(8, level="char", pad_token=1000)
    with pytest.raises(ValueError, match="val_fraction"):
        pydoc_topics(1.5)
    with pytest.raises(TypeError, match="text"):
        encode_text(b"bytes")
