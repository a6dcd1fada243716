"""The bundled MiniLM loads offline, adapts to query→product pairs, and the cache encodes only what is new."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.text_encoder import (
    EmbeddingCache,
    TextEncoderConfig,
    adapt,
    encode,
    encoder_fingerprint,
    for_inference,
    length_batches,
    load_minilm,
    save_adapted,
    saved_fingerprint,
    version_cache,
    version_cache_path,
)

TITLES = ["Boho Sterling Silver Necklace, Gift For Her", "Rustic Walnut Cutting Board", "Gothic Black Velvet Dress",
          "Minimalist White Ceramic Mug", "Vintage Brown Leather Tote Bag", "Cottagecore Pink Linen Pillow"]
QUERIES = ["bohemian 925 pendant", "farmhouse chopping board", "goth dress", "simple coffee cup", "retro purse",
           "floral cushion cover"]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm(TextEncoderConfig(max_seq_length=32))


def test_offline_minilm_gives_unit_vectors_that_match_related_text(minilm) -> None:
    config = TextEncoderConfig(int8=False)
    vectors = encode(minilm, TITLES + QUERIES, config)
    assert vectors.shape == (12, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    scores = vectors[6:] @ vectors[:6].T
    assert (scores.argmax(axis=1) == np.arange(6)).mean() >= 0.6  # off the shelf, most match


def test_int8_encoder_stays_close_to_float_and_ranks_alike(minilm) -> None:
    exact = encode(minilm, TITLES + QUERIES, TextEncoderConfig(int8=False))
    quick = encode(for_inference(minilm, TextEncoderConfig(int8=True)), TITLES + QUERIES, TextEncoderConfig(int8=True))
    assert np.min(np.sum(exact * quick, axis=1)) > 0.9
    rank = lambda v: (v[6:] @ v[:6].T).argmax(axis=1)  # noqa: E731
    assert (rank(exact) == rank(quick)).sum() >= 5  # int8 costs a little: off by default


def test_adaptation_lowers_the_pair_loss() -> None:
    model = load_minilm(TextEncoderConfig())
    config = TextEncoderConfig(adapt_epochs=4, adapt_batch_size=6, adapt_learning_rate=1e-4)
    losses = adapt(model, list(zip(QUERIES, TITLES, strict=True)), config)
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_cache_encodes_only_new_text(tmp_path, minilm) -> None:
    config = TextEncoderConfig(int8=False)
    calls: list[int] = []

    def encode_fn(texts):
        calls.append(len(texts))
        return encode(minilm, texts, config)

    cache = EmbeddingCache(tmp_path / "cache.parquet", encoder_version="v1")
    first, new = cache.encode(TITLES[:4], encode_fn)
    assert new == 4
    reopened = EmbeddingCache(tmp_path / "cache.parquet", encoder_version="v1")
    again, new = reopened.encode(TITLES, encode_fn)
    assert new == 2 and calls == [4, 2]
    assert np.allclose(again[:4], first, atol=1e-6)
    _, new = EmbeddingCache(tmp_path / "cache.parquet", encoder_version="v2").encode(TITLES[:1], encode_fn)
    assert new == 1  # another encoder version never reuses old vectors


def test_a_versions_cache_keeps_the_encodings_of_each_adapted_encoder_under_one_version_name(tmp_path, minilm) -> None:
    """A day retrained under its version name adapts its encoder again; on rebuilt features or another run config
    that is another encoder, whose product encodings must be its own, not the first run's from the shared cache."""
    config = TextEncoderConfig(int8=False)
    first = save_adapted(minilm, tmp_path / "first")
    retrained = load_minilm(TextEncoderConfig(max_seq_length=32))
    adapt(retrained, list(zip(QUERIES, TITLES, strict=True)), TextEncoderConfig(adapt_batch_size=6))
    second = save_adapted(retrained, tmp_path / "second")
    assert first != second and saved_fingerprint(tmp_path / "second") == second
    assert encoder_fingerprint(load_minilm(TextEncoderConfig(max_seq_length=32))) == first  # the same weights
    assert encoder_fingerprint(load_minilm(TextEncoderConfig(max_seq_length=64))) != first  # cut elsewhere

    cache_dir = tmp_path / "cache"
    mine, new = version_cache(cache_dir, "daily-20261014", first).encode(TITLES, lambda t: encode(minilm, t, config))
    assert new == 6
    theirs, new = version_cache(cache_dir, "daily-20261014", second).encode(
        TITLES, lambda t: encode(retrained, t, config))
    assert new == 6
    np.testing.assert_allclose(theirs, encode(retrained, TITLES, config), atol=1e-6)
    assert not np.allclose(theirs, mine, atol=1e-3)
    again, new = version_cache(cache_dir, "daily-20261014", first).encode(TITLES, lambda t: encode(minilm, t, config))
    assert new == 0 and np.array_equal(again, mine)  # the first registration (a rollback target) keeps its own

    # A bundle saved before fingerprints reads the cache its version wrote then, keyed by the version alone.
    EmbeddingCache(version_cache_path(cache_dir, "older"), "older").encode(TITLES, lambda t: encode(minilm, t, config))
    _, new = version_cache(cache_dir, "older", saved_fingerprint(tmp_path / "nowhere")).encode(
        TITLES, lambda t: encode(minilm, t, config))
    assert new == 0


def test_the_cache_opens_files_of_the_list_format_and_saves_every_row_exactly(tmp_path: Path) -> None:
    """Caches written before the matrix layout (a list<float> column) open as they are; after a new text
    the saved file holds every old row unchanged plus the new one, and a reopened cache returns them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    old = rng.standard_normal((3, 8), dtype=np.float32)
    cache = EmbeddingCache(tmp_path / "cache.parquet", encoder_version="v1")
    keys = [cache.key(t) for t in TITLES[:3]]
    pq.write_table(pa.table({"key": keys, "vector": pa.array(old.tolist(), pa.list_(pa.float32()))}), cache.path)

    def encode_fn(texts: list[str]) -> np.ndarray:
        return np.full((len(texts), 8), 7.0)  # float64 on purpose: the cache stores float32

    vectors, new = EmbeddingCache(cache.path, "v1").encode(TITLES[:4], encode_fn)
    assert new == 1 and vectors.dtype == np.float32
    assert np.array_equal(vectors[:3], old) and np.array_equal(vectors[3], np.full(8, 7.0, np.float32))
    again, new = EmbeddingCache(cache.path, "v1").encode(TITLES[3::-1], encode_fn)
    assert new == 0 and np.array_equal(again, vectors[::-1])
    with pytest.raises(ValueError, match="8-d encodings"):
        EmbeddingCache(cache.path, "v1").encode(TITLES[4:5], lambda texts: np.zeros((len(texts), 5)))


def test_length_batches_cover_every_text_once_within_the_token_budget() -> None:
    lengths = [5, 30, 7, 7, 12, 3, 30, 9]
    batches = length_batches(lengths, bucket_tokens=32, max_batch=3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)  # shortest first
    assert all(len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 32) for b in batches)


def test_batching_by_length_keeps_order_and_vectors(minilm) -> None:
    texts = TITLES + QUERIES + ["a much longer product title " * 6]
    plain = encode(minilm, texts, TextEncoderConfig(bucket_tokens=0))
    by_length = encode(minilm, texts, TextEncoderConfig(bucket_tokens=64, threads=1))
    assert np.allclose(plain, by_length, atol=1e-5)
    assert encode(minilm, [], TextEncoderConfig()).shape == (0, 384)
