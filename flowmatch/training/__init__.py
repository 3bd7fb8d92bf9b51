"""Training: objectives (the seam), the plan, the step, the trainer and the loop, checkpoints,
tracking (wandb imported lazily) and the data-parallel helpers for torchrun."""

from flowmatch.training.builders import Components, build_components
from flowmatch.training.checkpoint import FORMAT_VERSION, LoadedModel, load_checkpoint, load_model, save_checkpoint
from flowmatch.training.losses import LOSSES, cfm_loss, regression_loss, t_bin_sums
from flowmatch.training.loop import NUM_T_BINS, TrainResult, last_checkpoint, prepare_run_dir, train
from flowmatch.training.objectives import OBJECTIVES, CFM, Batch, Nets, Objective, OneStepDistill, build_objective
from flowmatch.training.plan import Plan, resolve_plan
from flowmatch.training.step import StepOutput, TrainStep
from flowmatch.training.tracking import TRACKING_MODES, Tracker, read_metrics, trim_metrics
from flowmatch.training.trainer import Trainer, build_trainer

__all__ = [
    "Components", "build_components", "FORMAT_VERSION", "LoadedModel", "load_checkpoint", "load_model",
    "save_checkpoint", "LOSSES", "cfm_loss", "regression_loss", "t_bin_sums", "NUM_T_BINS", "TrainResult",
    "last_checkpoint", "prepare_run_dir", "train", "OBJECTIVES", "CFM", "Batch", "Nets", "Objective",
    "OneStepDistill", "build_objective", "Plan", "resolve_plan", "StepOutput", "TrainStep", "TRACKING_MODES",
    "Tracker", "read_metrics", "trim_metrics", "Trainer", "build_trainer",
]
