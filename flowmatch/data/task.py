"""The source and target distributions a config's ``data`` section describes, toy or image.

Toy tasks pair two 2-D distributions from :data:`flowmatch.data.DATASETS`. Image tasks take their
target from :data:`flowmatch.data.IMAGE_DATASETS` (pixels in [-1, 1], ``[N, C, H, W]``) and a
``gaussian`` source of the same shape (the only image source: noise at t = 0). The data shape of a
config is known without loading its images (:func:`data_shape`), so a checkpoint rebuilds its model
cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from flowmatch.errors import ConfigError

__all__ = ["TaskData", "build_task", "build_source", "data_shape", "num_classes", "is_image_task",
           "FIXED_IMAGE_SHAPES"]

# (C, H, W) and class counts of the datasets whose shape is fixed (a folder's comes from the config)
FIXED_IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist5k": (1, 28, 28), "mnist": (1, 28, 28),
                      "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
_FIXED_CLASSES = {name: 10 for name in FIXED_IMAGE_SHAPES}


@dataclass
class TaskData:
    """``source`` (t = 0) and ``target`` (t = 1) with ``sample(n, *, generator, device)``; ``shape``
    is one draw's shape (``(2,)`` for toy data, ``(C, H, W)`` for images)."""

    source: Any
    target: Any
    shape: tuple
    num_classes: Optional[int]
    is_image: bool


def is_image_task(data_cfg) -> bool:
    from flowmatch.data.images import is_image_dataset

    return is_image_dataset(data_cfg.target)


def data_shape(data_cfg) -> tuple:
    """One sample's shape for ``data_cfg`` (a :class:`~flowmatch.config.DataConfig`), without
    loading images: ``(dim,)`` for toy data, ``(C, H, W)`` for images."""
    if not is_image_task(data_cfg):
        return (data_cfg.dim,)
    if data_cfg.target in FIXED_IMAGE_SHAPES:
        return FIXED_IMAGE_SHAPES[data_cfg.target]
    if data_cfg.image_size is None or data_cfg.channels is None:
        raise ConfigError(f"data.target={data_cfg.target} needs data.image_size and data.channels (the shape the "
                          f"model is built for; images are resized to image_size)")
    return (data_cfg.channels, data_cfg.image_size, data_cfg.image_size)


def num_classes(data_cfg) -> Optional[int]:
    """Class count of an image task with labels (``None`` for toy data or unlabeled folders)."""
    if not is_image_task(data_cfg):
        return None
    if data_cfg.target in _FIXED_CLASSES:
        return _FIXED_CLASSES[data_cfg.target]
    return build_task(data_cfg).num_classes


def build_task(data_cfg, split: Optional[str] = None) -> TaskData:
    """Build ``data_cfg``'s source and target; ``split`` (``train``/``test``/``val``/``fit``) overrides
    ``data_cfg.split`` for an image target (evaluation compares against the other split)."""
    from flowmatch.data.images import get_image_dataset
    from flowmatch.data.toy import get_dataset

    if not is_image_task(data_cfg):
        return TaskData(get_dataset(data_cfg.source, data_cfg.dim), get_dataset(data_cfg.target, data_cfg.dim),
                        (data_cfg.dim,), None, False)
    if data_cfg.source != "gaussian":
        raise ConfigError(f"image tasks start from data.source=gaussian (noise of the images' shape); "
                          f"got data.source={data_cfg.source}")
    target = get_image_dataset(data_cfg.target, split or data_cfg.split, root=data_cfg.root,
                               download=data_cfg.download, image_size=data_cfg.image_size,
                               channels=data_cfg.channels)
    shape = tuple(target.shape)
    if data_cfg.target not in FIXED_IMAGE_SHAPES and shape != data_shape(data_cfg):
        raise ConfigError(f"data.target={data_cfg.target} at {data_cfg.root} gives images of shape {shape}, "
                          f"the config says {data_shape(data_cfg)} (data.channels, data.image_size)")
    source = get_dataset("gaussian", shape=shape)
    return TaskData(source, target, shape, target.num_classes, True)


def build_source(data_cfg):
    """The source (t = 0) alone, without loading an image target: for images N(0, I) of
    :func:`data_shape` (the same object, and random stream, as :func:`build_task`'s source)."""
    from flowmatch.data.toy import get_dataset

    if not is_image_task(data_cfg):
        return get_dataset(data_cfg.source, data_cfg.dim)
    if data_cfg.source != "gaussian":
        raise ConfigError(f"image tasks start from data.source=gaussian (noise of the images' shape); "
                          f"got data.source={data_cfg.source}")
    return get_dataset("gaussian", shape=data_shape(data_cfg))
