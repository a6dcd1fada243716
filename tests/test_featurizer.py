"""The shared term featuriser: stable hashing, typo-robust trigrams, bounded bags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from training.featurizer import FeaturizerConfig, encode_texts, join_terms, searchable_words, term_ids

CONFIG = FeaturizerConfig(n_buckets=1 << 16, max_terms=64)


def test_ids_are_stable_across_processes() -> None:
    """Python's hash() is salted per process; the featuriser must not be, or serving would skew."""
    here = term_ids("Boho Sterling Silver Necklace", CONFIG)
    code = ("from training.featurizer import FeaturizerConfig, term_ids;"
            "print(term_ids('Boho Sterling Silver Necklace', FeaturizerConfig(n_buckets=1 << 16, max_terms=64)))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123"}).stdout
    assert str(here) == other.strip()


def test_a_typo_keeps_most_trigrams_but_no_word() -> None:
    right, typo = set(term_ids("necklace", CONFIG)), set(term_ids("neckless", CONFIG))
    assert len(right & typo) >= 4  # #ne, nec, eck, ckl, kle
    word_only = FeaturizerConfig(n_buckets=1 << 16, char_trigrams=False, bigrams=False)
    assert not set(term_ids("necklace", word_only)) & set(term_ids("neckless", word_only))


def test_bags_are_bounded_and_padding_bucket_is_never_used() -> None:
    ids = term_ids(" ".join(["word"] * 500), CONFIG)
    assert len(ids) == CONFIG.max_terms
    assert 0 not in ids and max(ids) < CONFIG.n_buckets


def test_encode_texts_pads_with_zero_and_keeps_empty_texts_empty() -> None:
    padded = encode_texts(["red mug", "", "mug"], CONFIG)
    assert padded.shape == (3, CONFIG.max_terms)
    assert not padded[1].any()  # the empty text has only padding
    mug = term_ids("mug", CONFIG)
    assert padded[2, : len(mug)].tolist() == mug and not padded[2, len(mug):].any()
    assert join_terms(None) == "" and join_terms(float("nan")) == "" and join_terms(["a", "b"]) == "a b"


@pytest.mark.parametrize(("typed", "plain"), [("ＣＨＡＩＲ ｃｏｖｅｒ", "chair cover"), ("Café crème", "cafe creme"),
                                              ("Straße", "strasse"), ("ﬁsh", "fish"), ("Łódź kılıf", "lodz kilif"),
                                              ("Coca™ x²", "coca tm x 2")])
def test_text_is_folded_to_the_letters_the_model_reads(typed: str, plain: str) -> None:
    """Fullwidth letters (a CJK input method's) lost every term, and "café" read as "caf". A symbol's letters are a
    word of their own ("Coca™" is not "cocatm")."""
    assert term_ids(typed, CONFIG) == term_ids(plain, CONFIG)
    assert searchable_words(typed) == plain.split()


def test_a_model_saved_before_folding_reads_text_as_it_was_trained_to() -> None:
    unfolded = CONFIG.model_copy(update={"unicode_folding": False})
    assert term_ids("ＣＨＡＩＲ", unfolded) == [] and term_ids("café", unfolded) == term_ids("caf", unfolded)
    assert encode_texts(["café"], unfolded).tolist() != encode_texts(["café"], CONFIG).tolist()
    assert searchable_words("!!! — 椅子") == []
