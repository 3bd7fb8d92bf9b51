"""Data: toy 2D distributions (generated; no files, no network) and image datasets (embedded, or read
from local files; downloaded only when asked)."""

from flowmatch.data.images import IMAGE_DATASETS, ImageDataset, get_image_dataset, is_image_dataset
from flowmatch.data.toy import DATASETS, ToyDistribution, get_dataset

__all__ = ["DATASETS", "ToyDistribution", "get_dataset", "IMAGE_DATASETS", "ImageDataset", "get_image_dataset",
           "is_image_dataset"]
