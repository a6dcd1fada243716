"""Training benchmark: examples/s and seconds of the unified model's training step (``training.train``)
with the nightly run's default configuration, on the default world and on a 1M-product catalogue.

The dataset is the training pipeline's own (``step_dataset``: Feast point-in-time), so the default
world must have its features built (``make demo``, or ``uer simulate`` + the feature DAG). Graph and
text encodings come from the pipeline's steps too (text cached by content hash under artifacts/).

``--large-products N`` also times the same examples against a catalogue padded to N products
(copies of real product rows under new ids; their text and graph encodings copied too). What grows
with the catalogue is the uniform-negative draw and the hard-negative refresh (the whole catalogue is
re-encoded every ``hard_refresh_steps``); the per-example cost is the rest. A large world's own
examples (24M events) are not needed to measure that.

Writes benchmarks/results/training.json: ``examples_per_s``, ``seconds``, ``world`` for the default
world and the same under ``large``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from retrieval_core.settings import get_settings  # noqa: E402
from training.stages import TrainingRunConfig, _with_encodings, step_dataset, step_graph, step_text  # noqa: E402
from training.train import train  # noqa: E402


def padded_catalogue(products: pd.DataFrame, size: int, seed: int = 7) -> pd.DataFrame:
    """``products`` plus copies of random rows under new ids, up to ``size`` rows."""
    extra = size - len(products)
    if extra <= 0:
        return products
    rng = np.random.default_rng(seed)
    copies = products.iloc[rng.integers(0, len(products), extra)].copy()
    copies["product_id"] = products["product_id"].max() + 1 + np.arange(extra)
    return pd.concat([products, copies], ignore_index=True)


def timed_training(examples: pd.DataFrame, products: pd.DataFrame, config: TrainingRunConfig) -> dict:
    train_config = config.train.model_copy(update={"model": config.model_config_()})
    result = train(examples, products, train_config, show_progress=False)
    return {"examples_per_s": round(result.examples_per_s, 1), "seconds": round(result.seconds, 1),
            "steps": train_config.steps, "batch_size": train_config.batch_size,
            "catalogue_products": len(products), "train_examples": len(examples),
            "final_loss": round(float(np.mean(result.losses[-20:])), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the nightly run's)")
    parser.add_argument("--large-products", type=int, default=1_000_000, help="0: skip the large catalogue")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    settings = get_settings()
    config = TrainingRunConfig()
    if args.steps:
        config = config.model_copy(update={"train": config.train.model_copy(update={"steps": args.steps})})
    work = args.work_dir or settings.artifacts_dir / "bench_training"
    dataset = work / "dataset"
    step_dataset(settings, dataset)
    step_graph(dataset, config.graph_dim, work / "graph.parquet")
    step_text(dataset, config, settings.artifacts_dir / "encoder_cache", "bench-training", work / "text.parquet")
    examples = pd.read_parquet(dataset / "examples.parquet")
    examples = examples[examples["split"] == "train"]
    products = _with_encodings(pd.read_parquet(dataset / "train_products.parquet"), work / "graph.parquet",
                               work / "text.parquet")
    print(f"default world: {len(examples)} examples, {len(products)} products", flush=True)
    figures: dict[str, object] = {"world": "default", "torch_threads": torch.get_num_threads(),
                                  "config": config.train.model_dump(exclude={"model"})}
    default = timed_training(examples, products, config)
    figures.update(default)
    print(f"default: {default}", flush=True)
    if args.large_products:
        large = timed_training(examples, padded_catalogue(products, args.large_products), config)
        figures["large"] = {**large, "world": f"default world's examples against a catalogue padded to "
                                              f"{args.large_products:,} products (see the module docstring)"}
        print(f"large: {large}", flush=True)
    write_result("training", figures, command="python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
