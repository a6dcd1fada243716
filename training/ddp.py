"""Entry point of the training step under torchrun (DistributedDataParallel, gloo on CPU).

    torchrun --nproc_per_node=2 -m training.ddp --dataset DIR --run-config JSON --out DIR

Reads the files of the dataset step, trains with every rank drawing its own batches, and writes the
model (rank 0) plus each rank's losses and a weight checksum (to check the ranks stayed in sync).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

from training.calibration import calibrate_channels
from training.dataset import validation_purchases
from training.stages import TrainingRunConfig, save_model
from training.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", type=Path, required=True, help="output folder of the dataset step")
    parser.add_argument("--run-config", default="{}", help="TrainingRunConfig as JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    config = TrainingRunConfig.model_validate_json(args.run_config)
    examples = pd.read_parquet(args.dataset / "examples.parquet")
    products = pd.read_parquet(args.dataset / "train_products.parquet")
    model_config = config.model_config_().model_copy(update={"text_dim": 0, "graph_dim": 0})
    result = train(examples[examples["split"] == "train"], products,
                   config.train.model_copy(update={"model": model_config}), show_progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    checksum = float(sum(p.double().sum() for p in result.model.parameters()))
    (args.out / f"rank{rank}.json").write_text(json.dumps({"losses": result.losses, "checksum": checksum,
                                                           "world_size": dist.get_world_size()}))
    if rank == 0:  # after the checksum: calibration (as in step_train) changes the mix of rank 0's copy
        calibration = calibrate_channels(result.model, validation_purchases(examples), products,
                                         config.calibration) if config.calibrate else None
        (args.out / "calibration.json").write_text(json.dumps(calibration.as_dict() if calibration else None))
        save_model(result.model, args.out / "model")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
