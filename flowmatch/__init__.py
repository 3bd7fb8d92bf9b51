"""flowmatch: rectified flow and conditional flow matching.

Time convention: ``t = 0`` is the source (noise), ``t = 1`` is data. A path is
``x_t = alpha(t) x1 + sigma(t) x0``; for rectified flow ``alpha = t, sigma = 1 - t`` and the target
velocity is ``u_t = x1 - x0``. A velocity model is called ``v(x, t)`` with ``x`` of shape
``[B, *D]`` and ``t`` of shape ``[B]`` (floats in [0, 1]) and returns ``[B, *D]``.
"""

__version__ = "0.1.0"

from flowmatch.config import ExperimentConfig, apply_overrides, load_config
from flowmatch.couplings import IndependentCoupling, MinibatchOTCoupling, get_coupling
from flowmatch.data import DATASETS, IMAGE_DATASETS, get_dataset, get_image_dataset
from flowmatch.errors import FlowmatchError
from flowmatch.metrics import frechet_distance, mmd, straightness, w2
from flowmatch.models import EMA, ClassifierFreeGuidance, MLPVelocity, UNetVelocity, build_model
from flowmatch.paths import AffinePath, get_path
from flowmatch.solvers import SOLVERS, get_solver, solve, time_grid
from flowmatch.timesteps import get_time_sampler
from flowmatch.training import cfm_loss, load_checkpoint, load_model, train
from flowmatch.types import LossOutput, PathSample, Trajectory

import flowmatch.distill  # noqa: E402,F401 - registers the objectives beyond flow matching (cd, ct)

__all__ = [
    "__version__", "ExperimentConfig", "apply_overrides", "load_config", "IndependentCoupling",
    "MinibatchOTCoupling", "get_coupling", "DATASETS", "get_dataset", "FlowmatchError", "mmd", "straightness", "w2",
    "EMA", "MLPVelocity", "build_model", "AffinePath", "get_path", "SOLVERS", "get_solver", "solve", "time_grid",
    "get_time_sampler", "cfm_loss", "load_checkpoint", "load_model", "train", "LossOutput", "PathSample",
    "Trajectory", "IMAGE_DATASETS", "get_image_dataset", "UNetVelocity", "ClassifierFreeGuidance",
    "frechet_distance",
]
