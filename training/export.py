"""Export a promoted model version to the BentoML model store: the query tower's weights and config
(the featuriser config is part of it), the boosting weights, and where its product embeddings are.
Serving loads exactly this bundle; one version id ties it to the embeddings in Feast."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from retrieval_core.settings import Settings
from training.boosting import PROJECTION_FILE

BENTO_MODEL_NAME = "unified_retrieval"


def bentoml_home(settings: Settings) -> Path:
    return settings.artifacts_dir / "bentoml"


def model_store(settings: Settings):  # noqa: ANN201 - bentoml's ModelStore
    """The settings' BentoML model store, passed explicitly: BENTOML_HOME is read once per process, so
    relying on it would let two settings objects in one process share (the first one's) store."""
    from bentoml._internal.models import ModelStore

    path = bentoml_home(settings) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return ModelStore(str(path))


def register_model(settings: Settings, version: str, models: Path, text_encoder: Path | None = None) -> str:
    """Save ``models/model`` (+ ``boost.json`` and the serving projection, + the adapted text encoder) as
    ``unified_retrieval:<tag>`` labelled with the version."""
    os.environ.setdefault("BENTOML_HOME", str(bentoml_home(settings)))
    import bentoml

    boost = json.loads((models / "boost.json").read_text()) if (models / "boost.json").exists() else None
    boost_features = (boost or {}).get("features") or []
    with bentoml.models.create(name=BENTO_MODEL_NAME, labels={"model_version": version},
                               _model_store=model_store(settings),
                               metadata={"model_version": version, "boost_features": boost_features,
                                         "serving_dim": (boost or {}).get("serving_dim", 0),
                                         "embedding_source": "feast:product_embeddings"}) as bento_model:
        shutil.copytree(models / "model", Path(bento_model.path) / "model")
        for name in ("boost.json", PROJECTION_FILE):
            if (models / name).exists():
                shutil.copy(models / name, Path(bento_model.path) / name)
        if text_encoder is not None and text_encoder.exists():
            shutil.copytree(text_encoder, Path(bento_model.path) / "text_encoder")
    return str(bento_model.tag)
