"""The training plan of the image models."""

from ._training_plan import ImageTrainingPlan

__all__ = ["ImageTrainingPlan"]
