"""Training of the image models: the training plan, the runner and its safety callbacks."""

from ._callbacks import (
    CellsPerSecondBar,
    CheckInputs,
    CheckpointWriteError,
    DivergenceGuard,
    EpochCheckpoint,
    EpochProgressLog,
    EpochSeed,
    NonFiniteCropsError,
    StopOnInterrupt,
    TrainingDivergedError,
)
from ._runner import ImageTrainRunner
from ._training_plan import ImageTrainingPlan

__all__ = [
    "CellsPerSecondBar",
    "CheckInputs",
    "CheckpointWriteError",
    "DivergenceGuard",
    "EpochCheckpoint",
    "EpochProgressLog",
    "EpochSeed",
    "ImageTrainRunner",
    "ImageTrainingPlan",
    "NonFiniteCropsError",
    "StopOnInterrupt",
    "TrainingDivergedError",
]
