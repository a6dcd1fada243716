"""Helpers for the serving tests: a free loopback port, a Milvus Lite server, a small trained model."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from retrieval_core.settings import MilvusSettings, Settings
from serving.engine import ensure_server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_milvus(settings: Settings, port: int, **milvus: object) -> Settings:
    config = MilvusSettings(uri=f"http://127.0.0.1:{port}", embedded_server=True, **milvus)
    return settings.model_copy(update={"milvus": config})


@contextmanager
def milvus_server(settings: Settings) -> Iterator[subprocess.Popen]:
    process = ensure_server(settings)
    assert process is not None, f"something already listens on {settings.milvus.uri}"
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def tiny_training_config():  # noqa: ANN201 - training.stages.TrainingRunConfig
    from training.featurizer import FeaturizerConfig
    from training.model import ModelConfig
    from training.stages import TrainingRunConfig
    from training.text_encoder import TextEncoderConfig
    from training.train import TrainConfig

    return TrainingRunConfig(
        train=TrainConfig(model=ModelConfig(featurizer=FeaturizerConfig(n_buckets=1 << 14)), steps=60,
                          distill_warm_start_steps=20, distill_batch_size=256, batch_size=64, warmup_steps=20,
                          ramp_steps=20, hard_refresh_steps=20),
        text=TextEncoderConfig(adapt_batch_size=32), adapt_pairs_max=64, graph_dim=16,
        boost={"trials": 5, "serving_dim": 256})  # the served vectors narrowed, as by default
