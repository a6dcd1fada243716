"""A model version as serving and indexing use it: the bundle registered in the BentoML model store by
the training export (query/product towers + featuriser config, boosting weights, adapted text encoder).

Both sides of the index go through here, and both call the training code's own batching and towers
(``training.batching``, ``training.boosting.augment`` with the version's boosting weights and serving
projection): the same input gives the same vector in training, indexing and the API.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from retrieval_core.errors import OperatorError
from retrieval_core.settings import Settings
from training.batching import product_batch, query_batch
from training.boosting import PROJECTION_FILE, augment, quality_vectors
from training.export import BENTO_MODEL_NAME, bentoml_home, model_store
from training.model import PackedUserState, UnifiedModel, UserState
from training.stages import load_model, load_projection
from training.text_encoder import TextEncoderConfig, encode, encoder_config, saved_fingerprint


class ModelNotFound(OperatorError, LookupError):
    """No bundle for the asked model version in the model store."""


class BundleInvalid(ModelNotFound):
    """A bundle is in the store but one of its files does not fit its model (corrupt, or from another run):
    it cannot be served, exactly as if it were missing."""


def _bentoml(settings: Settings):  # noqa: ANN202 - the bentoml module
    os.environ.setdefault("BENTOML_HOME", str(bentoml_home(settings)))
    import bentoml

    return bentoml


@dataclass(frozen=True)
class Registration:
    """One bundle in the model store: a model version may be registered more than once (a day retrained)."""
    model_version: str
    tag: str
    path: Path
    created: dt.datetime

    @property
    def bundle_id(self) -> str:
        return bundle_id_of(self.model_version, self.path)


def registrations(settings: Settings, model_version: str | None = None) -> list[Registration]:
    """Every bundle in the model store (or ``model_version``'s), oldest first."""
    bentoml = _bentoml(settings)
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(BENTO_MODEL_NAME, _model_store=model_store(settings))
    except NotFound:  # nothing registered yet
        return []
    found = [Registration(model.info.labels["model_version"], str(model.tag), Path(model.path),
                          model.info.creation_time) for model in models if model.info.labels.get("model_version")
             and model_version in (None, model.info.labels["model_version"])]
    return sorted(found, key=lambda registration: registration.created)


def registered_versions(settings: Settings) -> dict[str, Path]:
    """model_version → bundle directory, for every bundle in the store (newest registration wins)."""
    return {registration.model_version: registration.path for registration in registrations(settings)}


def registered_bundle_id(settings: Settings, model_version: str, tag: str) -> str:
    """The bundle id of ``model_version``'s registration ``tag`` (what ``training.export.register_model`` returns)."""
    for registration in registrations(settings, model_version):
        if registration.tag == tag:
            return registration.bundle_id
    raise ModelNotFound(f"{tag} (model version {model_version!r}) is not in the BentoML model store at "
                        f"{bentoml_home(settings)}")


def delete_registration(settings: Settings, registration: Registration) -> None:
    """Remove one bundle from the model store (a retired version's: ``serving.retention``)."""
    _bentoml(settings).models.delete(registration.tag, _model_store=model_store(settings))


def bundle_id_of(model_version: str, path: Path) -> str:
    """One registration of a model version (its bundle directory ``path``): a day retrained under the same
    version name is registered again, in another directory, and must never reuse what the first one computed."""
    return f"{model_version}@{path.name}"


@dataclass
class ModelBundle:
    model_version: str
    path: Path
    model: UnifiedModel
    boost_weights: np.ndarray  # appended to every query vector (zeros: no boosting)
    projection: np.ndarray | None = None  # (embedding_dim, serving_dim) applied to both sides first; None: full width

    @classmethod
    def load(cls, settings: Settings, model_version: str, bundle_id: str | None = None) -> ModelBundle:
        """The version's newest registration, or the one whose ``bundle_id`` is given (what built a collection)."""
        found = registrations(settings, model_version)
        if not found:
            raise ModelNotFound(f"model version {model_version!r} is not in the BentoML model store at "
                                f"{bentoml_home(settings)}; train and export it (uer train) first")
        if bundle_id is not None:
            found = [registration for registration in found if registration.bundle_id == bundle_id]
            if not found:
                raise ModelNotFound(f"the registration {bundle_id} of model version {model_version!r}, which built "
                                    f"the collection, is no longer in the BentoML model store at "
                                    f"{bentoml_home(settings)}; publish the version again (uer index publish)")
        return cls.from_directory(model_version, found[-1].path)

    @classmethod
    def from_directory(cls, model_version: str, path: Path) -> ModelBundle:
        damaged = (OSError, ValueError, KeyError, TypeError, EOFError)  # what json / np.load raise on a bad file
        try:
            model = load_model(path / "model")
        except (*damaged, RuntimeError, pickle.UnpicklingError) as exc:  # + torch.load's and load_state_dict's
            raise BundleInvalid(f"model version {model_version!r}: cannot load its towers from {path / 'model'} "
                                f"({exc!r}); re-export the version") from exc
        features = quality_vectors(pd.DataFrame(index=[0])).shape[1]
        boost = path / "boost.json"
        weights = np.zeros(features, np.float32)
        try:
            if boost.exists():
                weights = np.array(json.loads(boost.read_text())["weights"], np.float32)
        except damaged as exc:
            raise BundleInvalid(f"model version {model_version!r}: cannot read {boost} ({exc!r}); "
                                f"re-export the version") from exc
        try:
            projection = load_projection(path)
        except damaged as exc:
            raise BundleInvalid(f"model version {model_version!r}: cannot read {path / PROJECTION_FILE} "
                                f"({exc!r}); re-export the version") from exc
        if weights.shape != (features,) or not np.isfinite(weights).all():
            raise BundleInvalid(f"model version {model_version!r}: {boost} holds {weights.shape} weights, "
                                f"expected {features} finite ones; re-export the version")
        width = model.config.embedding_dim
        if projection is not None and (projection.ndim != 2 or projection.shape[0] != width
                                       or not 0 < projection.shape[1] < width or not np.isfinite(projection).all()):
            raise BundleInvalid(f"model version {model_version!r}: {path / PROJECTION_FILE} has shape "
                                f"{projection.shape}, expected ({width}, n) with 0 < n < {width}, finite; "
                                f"it is not this model's projection — re-export the version")
        return cls(model_version, path, model, weights, projection)

    @property
    def bundle_id(self) -> str:
        return bundle_id_of(self.model_version, self.path)

    @cached_property
    def signed_out_state(self) -> PackedUserState:
        """The state of a user without history; also the layout of every packed state of this model."""
        return self.user_states([{}]).row(0)

    @property
    def dim(self) -> int:
        """Dimension of the vectors in the index: tower output (narrowed, if projected) + boosting features."""
        width = self.model.config.embedding_dim if self.projection is None else self.projection.shape[1]
        return width + len(self.boost_weights)

    def user_states(self, rows: Sequence[Mapping[str, object]]) -> UserState:
        """The query tower's reading of each row's user from its ``query_tower_v1`` features ({} = signed
        out): what ``query_vectors`` would compute from the same rows, minus the query."""
        with torch.inference_mode():
            return self.model.query_tower.user_state(query_batch(rows, self.model.config))

    def query_vectors(self, rows: Sequence[Mapping[str, object]], states: UserState | None = None) -> np.ndarray:
        """``[q, w]`` for rows of ``query`` + the ``query_tower_v1`` features (absent: signed out). With
        ``states`` (one row per row, from ``user_states``) only each row's ``query`` is read: the
        service's path, which reuses a user's state across requests."""
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        if states is not None:
            rows = [{"query": row["query"]} for row in rows]
        with torch.inference_mode():
            q = self.model.query_tower(query_batch(rows, self.model.config), states).numpy()
        _, vectors = augment(q[:0], np.zeros((0, len(self.boost_weights)), np.float32), q, self.boost_weights,
                             self._query_projection)
        return vectors

    @cached_property
    def _query_projection(self) -> np.ndarray | None:
        """The projection in float64, converted once (the query side is projected in float64)."""
        return None if self.projection is None else self.projection.astype(np.float64)

    def product_vectors(self, products: pd.DataFrame, batch_size: int = 4096) -> np.ndarray:
        """``[p, quality(p)]`` for rows of ``product_tower_v1`` features (with text/graph encodings)."""
        parts = []
        with torch.inference_mode():
            for start in range(0, len(products), batch_size):
                chunk = products.iloc[start:start + batch_size]
                parts.append(self.model.product_tower(product_batch(chunk.to_dict("records"), self.model.config)))
        p = torch.cat(parts).numpy() if parts else np.zeros((0, self.model.config.embedding_dim), np.float32)
        vectors, _ = augment(p, quality_vectors(products), p[:0], self.boost_weights, self.projection)
        return vectors

    @cached_property
    def text_encoder(self) -> torch.nn.Module | None:
        """The version's adapted MiniLM (for products that have no text encoding of this version yet)."""
        directory = self.path / "text_encoder"
        if not self.model.config.text_dim or not directory.exists():
            return None
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(directory), device="cpu")

    @cached_property
    def text_fingerprint(self) -> str | None:
        """The adapted encoder's fingerprint (weights, sequence length), saved with it: its cached encodings' key."""
        return saved_fingerprint(self.path / "text_encoder")

    def encode_texts(self, texts: list[str], config: TextEncoderConfig | None = None) -> np.ndarray:
        """Encodings of ``texts`` as training made the version's (by default with the sequence length it used)."""
        if self.text_encoder is None:
            raise ModelNotFound(f"model version {self.model_version!r} has no text encoder in its bundle")
        return encode(self.text_encoder, texts, config or encoder_config(self.text_encoder))
