"""A tiny KFP pipeline shaped like the training pipeline: outputs of each kind, one step under ``dsl.If``.
(No ``from __future__ import annotations``: KFP reads the artefact annotations at decoration.)"""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Model, Output


@dsl.component
def make(data: Output[Dataset], report: Output[Metrics]) -> bool:
    return True


@dsl.component
def fit(model: Output[Model], scores: Output[Metrics]) -> None:
    pass


@dsl.pipeline(name="shape")
def shape() -> None:
    made = make()
    with dsl.If(made.outputs["Output"] == True):  # noqa: E712 - a KFP condition, not a Python comparison
        fit()
