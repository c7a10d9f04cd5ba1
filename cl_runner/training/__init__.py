"""Training: the loop that owns the optimizer step (loop.py), the objective (loss.py), how
examples become tensors (batching.py) and mixed precision (precision.py)."""

from cl_runner.training.batching import BATCH_LAYOUTS, collate, length_grouped_batches, training_batch
from cl_runner.training.loop import TrainingLoop, check_trainer_config, linear_schedule, require_setting, step_token_weights
from cl_runner.training.loss import LossOutput, answer_token_loss, weighted_objective
from cl_runner.training.precision import PRECISIONS, MasterWeights, autocast_context

__all__ = [
    "PRECISIONS", "LossOutput", "MasterWeights", "TrainingLoop", "answer_token_loss", "autocast_context", "check_trainer_config",
    "BATCH_LAYOUTS", "collate", "length_grouped_batches", "linear_schedule", "training_batch", "require_setting", "step_token_weights", "weighted_objective",
]
