"""Text featurisation shared by both towers, by training and by serving (one code path, no skew).

A text becomes a bag of hashed *terms*: word unigrams, word bigrams and character trigrams of each
word (with boundary marks, so "neckless" still shares most trigrams with "necklace"). Hashing uses
CRC32 with a per-kind salt: stable across processes and machines, unlike Python's ``hash``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, Field

_WORD = re.compile(r"[a-z0-9]+")


class FeaturizerConfig(BaseModel):
    """Saved with every model version; serving rebuilds the exact featuriser from it."""

    n_buckets: int = Field(1 << 18, ge=1024, description="hash space of the term embedding table")
    max_terms: int = Field(96, ge=8, description="terms kept per text (unigrams first)")
    bigrams: bool = True
    char_trigrams: bool = True


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words (HTML already unescaped upstream)."""
    return _WORD.findall(text.lower())


def _bucket(kind: bytes, term: str, n_buckets: int) -> int:
    # Bucket 0 is reserved for padding.
    return 1 + zlib.crc32(kind + term.encode()) % (n_buckets - 1)


def term_ids(text: str, config: FeaturizerConfig) -> list[int]:
    """Hashed term ids of one text: unigrams, then bigrams, then character trigrams, truncated."""
    return list(_term_ids(text, config.n_buckets, config.max_terms, config.bigrams, config.char_trigrams))


@lru_cache(maxsize=500_000)
def _term_ids(text: str, n: int, max_terms: int, bigrams: bool, char_trigrams: bool) -> tuple[int, ...]:
    # Cached: queries, history items and titles repeat a lot, and hashing is the hot path of training.
    toks = words(text)
    ids = [_bucket(b"w", t, n) for t in toks]
    if bigrams:
        ids += [_bucket(b"b", f"{a} {b}", n) for a, b in zip(toks, toks[1:], strict=False)]
    if char_trigrams:
        for t in toks:
            padded = f"#{t}#"
            ids += [_bucket(b"c", padded[i:i + 3], n) for i in range(len(padded) - 2)]
    return tuple(ids[:max_terms])


def encode_texts(texts: Sequence[str], config: FeaturizerConfig) -> np.ndarray:
    """Term ids of each text, right-padded with 0 to (len(texts), max_terms): the input of an
    ``EmbeddingBag`` with ``padding_idx=0`` (an empty text embeds to zeros)."""
    out = np.zeros((len(texts), config.max_terms), dtype=np.int64)
    key = (config.n_buckets, config.max_terms, config.bigrams, config.char_trigrams)
    for i, text in enumerate(texts):
        ids = _term_ids(text or "", *key)
        out[i, : len(ids)] = ids
    return out


def stable_bucket(value: object, n_buckets: int) -> int:
    """A categorical value (category path, country, shop id) hashed into 1..n_buckets-1; None → 0."""
    if value is None or (isinstance(value, float) and value != value):
        return 0
    return _bucket(b"v", str(value), n_buckets)


def join_terms(items: Iterable[object] | None) -> str:
    """A list feature (queries, tags, words) as one text for the term encoder; None/NaN → ''."""
    if items is None or isinstance(items, float):
        return ""
    return " ".join(str(i) for i in items)
