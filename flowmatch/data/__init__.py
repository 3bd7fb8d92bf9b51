"""Data: toy 2D distributions (generated; no files, no network)."""

from flowmatch.data.toy import DATASETS, ToyDistribution, get_dataset

__all__ = ["DATASETS", "ToyDistribution", "get_dataset"]
