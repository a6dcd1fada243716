"""Text featurisation shared by both towers, by training and by serving (one code path, no skew).

A text becomes a bag of hashed *terms*: word unigrams, word bigrams and character trigrams of each
word (with boundary marks, so "neckless" still shares most trigrams with "necklace"). Hashing uses
CRC32 with a per-kind salt: stable across processes and machines, unlike Python's ``hash``.
"""

from __future__ import annotations

import re
import unicodedata
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
    # Before it, "ＣＨＡＩＲ" (typed with a CJK input method) and "café" lost letters ("caf"), or every term.
    # A bundle saved before the field read text without it (``training.stages.load_model`` says so).
    unicode_folding: bool = Field(True, description="fold text to a-z/0-9 first: compatibility forms (fullwidth "
                                  "letters, ligatures) decomposed, accents dropped, case folded")


# Letters that Unicode does not decompose into a base letter and an accent.
_BASE_LETTERS = {"ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ı": "i",
                 "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH"}


@lru_cache(maxsize=8192)
def _fold_char(char: str) -> str:
    decomposed = unicodedata.normalize("NFKD", _BASE_LETTERS.get(char, char))
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    # A symbol's or number's letters are a word of their own: "Coca™" is "coca tm", not "cocatm"; "x²" is "x 2".
    return f" {kept} " if unicodedata.category(char) in ("So", "No", "Nl") else kept


def fold(text: str) -> str:
    """``text`` decomposed (NFKD: fullwidth "Ａ" → "A", "ﬁ" → "fi", "é" → "e" + accent), without its accents,
    with a few letters that do not decompose mapped to their base ("ø" → "o", "æ" → "ae"), case-folded ("ß" → "ss")."""
    if text.isascii():
        return text.lower()
    return "".join(map(_fold_char, text)).casefold()


def words(text: str, unicode_folding: bool = False) -> list[str]:
    """Lower-cased alphanumeric words (HTML already unescaped upstream), of the folded text if asked."""
    return _WORD.findall(fold(text) if unicode_folding else text.lower())


def searchable_words(text: str) -> list[str]:
    """The words a model reads from ``text`` (with folding, as every model trained since it existed): none means the
    text carries nothing to search for (punctuation only, or a script the featuriser does not read)."""
    return words(text, unicode_folding=True)


def _bucket(kind: bytes, term: str, n_buckets: int) -> int:
    # Bucket 0 is reserved for padding.
    return 1 + zlib.crc32(kind + term.encode()) % (n_buckets - 1)


def term_ids(text: str, config: FeaturizerConfig) -> list[int]:
    """Hashed term ids of one text: unigrams, then bigrams, then character trigrams, truncated."""
    return list(_term_ids(text, *_key(config)))


def _key(config: FeaturizerConfig) -> tuple[int, int, bool, bool, bool]:
    return config.n_buckets, config.max_terms, config.bigrams, config.char_trigrams, config.unicode_folding


@lru_cache(maxsize=500_000)
def _term_ids(text: str, n: int, max_terms: int, bigrams: bool, char_trigrams: bool,
              unicode_folding: bool) -> tuple[int, ...]:
    # Cached: queries, history items and titles repeat a lot, and hashing is the hot path of training.
    toks = words(text, unicode_folding)
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
    key = _key(config)
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
