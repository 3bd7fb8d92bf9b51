"""Metrics: distances between clouds (W2, MMD) and straightness of a flow."""

from flowmatch.metrics.distances import DEFAULT_BANDWIDTHS, gaussian_w2, mmd, w2
from flowmatch.metrics.likelihood import LikelihoodResult, exact_divergence, hutchinson_divergence, log_likelihood
from flowmatch.metrics.straightness import StraightnessResult, straightness

__all__ = ["DEFAULT_BANDWIDTHS", "gaussian_w2", "mmd", "w2", "StraightnessResult", "straightness"]
__all__ += ["LikelihoodResult", "log_likelihood", "exact_divergence", "hutchinson_divergence"]
