"""A small language-modelling corpus from the standard library: ``pydoc_data.topics``.

``pydoc_data.topics.topics`` is a dict ``{topic name: documentation text}`` shipped with every
CPython (about 80 topics, 0.47 MB of text in 3.11). Nothing is downloaded.

Conventions
-----------
* **Split** (fixed, by document): topic ``t`` is a validation document iff
  ``zlib.crc32(t) % 10 < round(10 · val_fraction)``; the decision depends only on the topic's
  name, not on the Python version or the other topics. Documents are taken in sorted-name order.
* **Tokens**: ``level="byte"``: the UTF-8 bytes, vocabulary ``0..255``; ``level="char"``: Unicode
  characters, vocabulary = the sorted set of characters of the whole corpus (train and
  validation, so no validation character is unknown; it depends on the Python version's text).
* **Sequences** of ``context`` tokens: inputs ``x[i : i+S]``, next-token targets ``x[i+1 : i+S+1]``
  over non-overlapping windows. ``pad=False``: the documents (each followed by ``"\\n\\n"``) form
  one stream per split, the final partial window is dropped. ``pad=True``: every document is
  cut separately, and its last window is padded — inputs with ``pad_token``, targets with
  ``ignore_index`` (``-100``, what ``nn.CrossEntropyLoss`` skips).
* The result is a :class:`~curvlab.data.Dataset` with ``int64`` inputs and targets of shape
  ``(N, S)``, ``task="classification"``, ``num_classes`` = vocabulary size.

Example:
    >>> ds = load_pydoc_topics(context=32)
    >>> ds.x_train.shape[1:], ds.x_train.dtype, ds.num_classes
    (torch.Size([32]), torch.int64, 256)
    >>> bool((ds.x_train[:, 1:] == ds.y_train[:, :-1]).all())
    True
"""

from __future__ import annotations

import zlib
from typing import Literal

import torch
from torch import Tensor

from curvlab.data.dataset import Dataset, _check_count, _check_device

__all__ = ["decode_tokens", "encode_text", "load_pydoc_topics", "pydoc_topics", "text_vocabulary"]

Level = Literal["byte", "char"]
_SEPARATOR = "\n\n"


def pydoc_topics(val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """``(train topic names, validation topic names)`` of ``pydoc_data.topics`` (fixed split).

    Example:
        >>> train, val = pydoc_topics()
        >>> set(train).isdisjoint(val), len(val) > 0
        (True, True)
    """
    from pydoc_data.topics import topics

    if not isinstance(val_fraction, float | int) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"pydoc_topics: val_fraction must lie in (0, 1), got {val_fraction!r}")
    buckets = max(1, round(10 * val_fraction))
    names = sorted(topics)
    val = [t for t in names if zlib.crc32(t.encode()) % 10 < buckets]
    train = [t for t in names if t not in set(val)]
    return train, val


def _topics_text(names: list[str]) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[t] for t in names]


def text_vocabulary(level: Level = "byte") -> tuple[str, ...] | None:
    """The characters of ``level="char"`` (sorted, whole corpus); ``None`` for ``"byte"``.

    Example:
        >>> vocab = text_vocabulary("char")
        >>> "a" in vocab and list(vocab) == sorted(vocab)
        True
    """
    _check_level(level)
    if level == "byte":
        return None
    train, val = pydoc_topics()
    return tuple(sorted(set(_SEPARATOR.join(_topics_text(sorted(train + val))) + _SEPARATOR)))


def _check_level(level: str) -> None:
    if level not in ("byte", "char"):
        raise ValueError(f"pydoc topics: level must be 'byte' or 'char', got {level!r}")


def encode_text(text: str, level: Level = "byte",
                vocab: tuple[str, ...] | None = None) -> Tensor:
    """Token ids (``int64``, 1-D) of ``text``: UTF-8 bytes, or indices into ``vocab`` for
    ``level="char"`` (default :func:`text_vocabulary`); unknown characters raise ``KeyError``.

    Example:
        >>> encode_text("hi").tolist()
        [104, 105]
    """
    _check_level(level)
    if not isinstance(text, str):
        raise TypeError(f"encode_text: text must be a str, got {type(text).__name__}")
    if level == "byte":
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
    index = {c: i for i, c in enumerate(vocab if vocab is not None else text_vocabulary("char"))}
    try:
        return torch.tensor([index[c] for c in text], dtype=torch.int64)
    except KeyError as err:
        raise KeyError(f"encode_text: character {err.args[0]!r} is not in the vocabulary") from None


def decode_tokens(tokens: Tensor, level: Level = "byte",
                  vocab: tuple[str, ...] | None = None) -> str:
    """Inverse of :func:`encode_text`; negative ids (``ignore_index`` padding) are dropped.

    Example:
        >>> decode_tokens(encode_text("héllo"))
        'héllo'
    """
    _check_level(level)
    ids = [int(t) for t in torch.as_tensor(tokens).reshape(-1).tolist() if int(t) >= 0]
    if level == "byte":
        return bytes(ids).decode("utf-8", errors="replace")
    chars = vocab if vocab is not None else text_vocabulary("char")
    return "".join(chars[i] for i in ids)


def _windows(stream: Tensor, context: int, pad: bool, pad_token: int,
             ignore_index: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping ``(inputs, targets)`` windows of one token stream."""
    n_full = (stream.numel() - 1) // context
    x = stream[: n_full * context].reshape(n_full, context)
    y = stream[1: n_full * context + 1].reshape(n_full, context)
    rest = stream.numel() - 1 - n_full * context
    if pad and rest > 0:
        xt = torch.full((1, context), pad_token, dtype=torch.int64)
        yt = torch.full((1, context), ignore_index, dtype=torch.int64)
        xt[0, :rest] = stream[n_full * context: n_full * context + rest]
        yt[0, :rest] = stream[n_full * context + 1:]
        x, y = torch.cat([x, xt]), torch.cat([y, yt])
    return x, y


def _split(names: list[str], level: Level, vocab: tuple[str, ...] | None, context: int,
           pad: bool, pad_token: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    docs = _topics_text(names)
    if pad:
        parts = [_windows(encode_text(d + _SEPARATOR, level, vocab), context, True, pad_token,
                          ignore_index) for d in docs]
    else:
        stream = encode_text("".join(d + _SEPARATOR for d in docs), level, vocab)
        parts = [_windows(stream, context, False, pad_token, ignore_index)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def load_pydoc_topics(context: int = 64, *, level: Level = "byte", val_fraction: float = 0.1,
                      pad: bool = False, pad_token: int = 0, ignore_index: int = -100,
                      device: torch.device | str = "cpu") -> Dataset:
    """Fixed-length next-token sequences of ``pydoc_data.topics`` (conventions: module doc).

    Args:
        context: Sequence length ``S``.
        level: ``"byte"`` (vocabulary 256) or ``"char"`` (:func:`text_vocabulary`).
        val_fraction: Fraction of the hash buckets (tenths) that hold validation topics.
        pad: Cut each document separately and pad its last window (targets ``ignore_index``).
        pad_token: Input id at padded positions (``0 <= pad_token < vocabulary size``).
        ignore_index: Target at padded positions (negative, so it is never a token id).
        device: Device of the returned tensors.

    Returns:
        :class:`~curvlab.data.Dataset` named ``"pydoc-topics-<level>"``: ``x``/``y`` ``int64``
        ``(N, S)``; ``test`` is the validation split.

    Example:
        >>> ds = load_pydoc_topics(context=16, level="char", pad=True)
        >>> bool((ds.y_train == -100).any()), int(ds.x_train.max()) < ds.num_classes
        (True, True)
    """
    _check_level(level)
    context = _check_count(context, "load_pydoc_topics: context", minimum=1)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or ignore_index >= 0:
        raise ValueError(
            f"load_pydoc_topics: ignore_index must be a negative int, got {ignore_index!r}")
    vocab = text_vocabulary(level)
    size = 256 if vocab is None else len(vocab)
    if isinstance(pad_token, bool) or not isinstance(pad_token, int) or not 0 <= pad_token < size:
        raise ValueError(
            f"load_pydoc_topics: pad_token must be an int in [0, {size}), got {pad_token!r}")
    dev = _check_device(device)
    train, val = pydoc_topics(val_fraction)
    xtr, ytr = _split(train, level, vocab, context, pad, pad_token, ignore_index)
    xva, yva = _split(val, level, vocab, context, pad, pad_token, ignore_index)
    return Dataset(xtr.to(dev), ytr.to(dev), xva.to(dev), yva.to(dev),
                   name=f"pydoc-topics-{level}", num_classes=size, input_shape=(context,))
