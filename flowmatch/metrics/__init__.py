"""Metrics: distances between clouds (W2, MMD), straightness of a flow, log-likelihood, image
Fréchet distance / KID in a small classifier's feature space, the memorisation check, precision and recall, the
class balance and ambiguous samples, and the noise floor coupled to a model."""

from flowmatch.metrics.distances import DEFAULT_BANDWIDTHS, gaussian_w2, mmd, w2
from flowmatch.metrics.guard import NonFiniteInputWarning
from flowmatch.metrics.likelihood import LikelihoodResult, exact_divergence, hutchinson_divergence, log_likelihood
from flowmatch.metrics.straightness import StraightnessResult, straightness

__all__ = ["DEFAULT_BANDWIDTHS", "gaussian_w2", "mmd", "w2", "StraightnessResult", "straightness"]
__all__ += ["NonFiniteInputWarning"]
__all__ += ["LikelihoodResult", "log_likelihood", "exact_divergence", "hutchinson_divergence"]
from flowmatch.metrics.frechet import (ImageFeatureMetrics, MetricError, frechet_distance, gaussian_frechet,
                                      inception_fid, kernel_distance, load_feature_classifier)

__all__ += ["ImageFeatureMetrics", "MetricError", "frechet_distance", "gaussian_frechet", "inception_fid",
            "kernel_distance", "load_feature_classifier"]
from flowmatch.metrics.memorisation import MemorisationResult, memorisation, nearest_distances

__all__ += ["MemorisationResult", "memorisation", "nearest_distances"]
from flowmatch.metrics.floor import CoupledFloor, paired_ratio

__all__ += ["CoupledFloor", "paired_ratio"]
from flowmatch.metrics.coverage import PrecisionRecall, PrecisionRecallReference, precision_recall

__all__ += ["PrecisionRecall", "PrecisionRecallReference", "precision_recall"]
from flowmatch.metrics.classes import ClassBalance, ClassBalanceReference, class_balance

__all__ += ["ClassBalance", "ClassBalanceReference", "class_balance"]
