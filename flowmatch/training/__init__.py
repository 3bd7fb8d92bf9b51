"""Training: losses, the step and the loop, checkpoints, tracking (wandb imported lazily) and the
data-parallel helpers for torchrun."""

from flowmatch.training.builders import Components, build_components
from flowmatch.training.checkpoint import (FORMAT_VERSION, LoadedModel, atomic_save, atomic_write_text, file_sha256,
                                           load_checkpoint, load_model, save_checkpoint)
from flowmatch.training.distributed import dist_info, init_distributed_from_env, is_main
from flowmatch.training.fast import (CHANNELS_LAST_MODES, COMPILE_MODES, FAST_MODES, PRECISIONS, SpeedPlan, StepOutput,
                                     Trainer, TrainStep, build_trainer, resolve_plan, resolve_speed)
from flowmatch.training.losses import LOSSES, cfm_loss, t_bin_sums
from flowmatch.training.loop import NUM_T_BINS, TrainResult, last_checkpoint, prepare_run_dir, train
from flowmatch.training.tracking import TRACKING_MODES, Tracker, read_metrics, trim_metrics

__all__ = [
    "Components", "build_components", "FORMAT_VERSION", "LoadedModel", "atomic_save", "atomic_write_text",
    "file_sha256", "load_checkpoint", "load_model", "save_checkpoint", "LOSSES", "cfm_loss", "t_bin_sums",
    "NUM_T_BINS", "TrainResult", "last_checkpoint", "prepare_run_dir", "train", "TRACKING_MODES", "Tracker",
    "read_metrics", "trim_metrics", "COMPILE_MODES", "FAST_MODES", "SpeedPlan", "StepOutput", "Trainer", "TrainStep",
    "build_trainer", "resolve_speed", "resolve_plan", "PRECISIONS", "CHANNELS_LAST_MODES", "dist_info",
    "init_distributed_from_env", "is_main",
]
