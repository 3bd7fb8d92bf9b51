"""Training the small feature classifier of the Frechet distance on small image datasets.

:func:`train_feature_classifier` fits a :class:`~flowmatch.models.classifier.FeatureClassifier` to a
dataset's train split with cross-entropy, AdamW and a cosine learning-rate decay, and measures its
accuracy on the train and test splits. Every draw (initial weights, batch order, augmentation) comes
from the ``seed``; the global generators are left untouched, and on the CPU two runs with the same
arguments give identical weights.

Augmentation (``augment=True``): each training image is shifted by a random whole number of pixels
in ``[-s, s]`` along each axis, ``s = max(1, H // 14)`` (1 pixel at 8x8, 2 at 28x28), the border
replicated (the border of these digits is background).

:func:`save_feature_classifier` writes ``{format, format_version, info, state_dict}`` atomically; the
file holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``
(:func:`flowmatch.metrics.frechet.load_feature_classifier`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from flowmatch.data.images import get_image_dataset
from flowmatch.io import atomic_save
from flowmatch.models.classifier import FeatureClassifier
from flowmatch.utils import make_generator, resolve_device

__all__ = ["train_feature_classifier", "save_feature_classifier", "classifier_accuracy", "shift_images",
           "CLASSIFIER_FORMAT", "CLASSIFIER_FORMAT_VERSION"]

CLASSIFIER_FORMAT = "flowmatch-feature-classifier"
CLASSIFIER_FORMAT_VERSION = 1


def shift_images(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image of ``x`` ``[B, C, H, W]`` by its own random offset ``(dy, dx)`` in
    ``[-max_shift, max_shift]^2`` (integers), replicating the border. ``generator`` must live on
    ``x``'s device."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    s = int(max_shift)
    off = torch.randint(-s, s + 1, (2, b), generator=generator, device=x.device)
    padded = F.pad(x, (s, s, s, s), mode="replicate")
    rows = torch.arange(h, device=x.device)[None, :] + s + off[0][:, None]  # [B, H]
    cols = torch.arange(w, device=x.device)[None, :] + s + off[1][:, None]  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def classifier_accuracy(model: FeatureClassifier, x: torch.Tensor, y: torch.Tensor, *,
                        batch_size: int = 1000) -> float:
    """Fraction of images ``x`` ``[N, C, H, W]`` whose arg-max logit equals the label ``y`` ``[N]``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i:i + batch_size].to(device, torch.float32))
        correct += int((logits.argmax(dim=1).cpu() == y[i:i + batch_size].cpu()).sum())
    model.train(was_training)
    return correct / max(x.shape[0], 1)


def train_feature_classifier(dataset: str, *, steps: int = 1500, batch_size: int = 64, lr: float = 3e-3,
                             weight_decay: float = 1e-4, width: int = 24, feature_dim: int = 128, seed: int = 0,
                             device: str | torch.device = "cpu", augment: bool = True, root: Optional[str] = None,
                             ) -> tuple[FeatureClassifier, dict]:
    """Train a :class:`FeatureClassifier` on the train split of the image dataset ``dataset`` (read
    from ``root`` for the datasets kept in files, e.g. ``cifar10``).

    AdamW (``lr``, ``weight_decay``), ``steps`` steps of ``batch_size`` images drawn by shuffled
    epochs, a linear warm-up over the first 5% of the steps then cosine decay to 0. Returns the model
    (eval mode, gradients off) and ``info``: ``{dataset, shape, num_classes, width, feature_dim,
    steps, batch_size, lr, weight_decay, augment, seed, train_accuracy, test_accuracy,
    torch_version}``, the accuracies measured on the full train and test splits.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_feature_classifier: steps and batch_size must be >= 1, got {steps}, {batch_size}")
    dev = resolve_device(device)
    train_set = get_image_dataset(dataset, split="train", root=root)
    test_set = get_image_dataset(dataset, split="test", root=root)
    shape = tuple(int(s) for s in train_set.shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"train_feature_classifier takes square images (C, H, H); {dataset} has shape {shape}")
    if not train_set.num_classes:
        raise ValueError(f"train_feature_classifier needs class labels; {dataset} has none")
    x, y = train_set.tensors(device=dev)
    x, y = x.float(), y.long()
    n = x.shape[0]

    with torch.random.fork_rng(devices=[]):  # the initial weights come from the seed, not the global state
        torch.manual_seed(seed)
        model = FeatureClassifier(shape[0], shape[1], int(train_set.num_classes), width=width,
                                  feature_dim=feature_dim)
    model.to(dev).train()
    gen = make_generator(seed, dev)
    max_shift = max(1, shape[1] // 14) if augment else 0

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    order = torch.randperm(n, generator=gen, device=dev)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:  # a new epoch: reshuffle (the tail of the last one is dropped)
            order, pos = torch.randperm(n, generator=gen, device=dev), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        xb = shift_images(x[idx], max_shift, gen)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    model.eval().requires_grad_(False)
    xt, yt = test_set.tensors(device=dev)
    info = {
        "dataset": dataset, "shape": list(shape), "num_classes": int(train_set.num_classes),
        "width": int(width), "feature_dim": int(feature_dim), "steps": int(steps), "batch_size": int(batch_size),
        "lr": float(lr), "weight_decay": float(weight_decay), "augment": bool(augment), "seed": int(seed),
        "train_accuracy": classifier_accuracy(model, x, y), "test_accuracy": classifier_accuracy(model, xt, yt),
        "torch_version": str(torch.__version__),  # TorchVersion is not weights-only loadable
    }
    return model, info


def _check_plain(value, where: str) -> None:
    """Refuse values the weights-only unpickler would refuse (anything but plain containers and scalars)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if type(k) is not str:
                raise ValueError(f"save_feature_classifier: {where} has a key of type {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif value is not None and type(value) not in (str, int, float, bool):
        raise ValueError(f"save_feature_classifier: {where} is a {type(value).__name__}; info holds plain "
                         f"values only (str, int, float, bool, None, lists, dicts)")


def save_feature_classifier(model: FeatureClassifier, info: dict, path: str) -> None:
    """Write ``{format, format_version, info, state_dict}`` to ``path`` atomically (temporary file,
    then rename). The weights are stored on the CPU; ``info`` must hold plain values only."""
    required = ("dataset", "shape", "num_classes", "width", "feature_dim")
    missing = [k for k in required if k not in info]
    if missing:
        raise ValueError(f"save_feature_classifier: info lacks {', '.join(missing)}")
    _check_plain(info, "info")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_save({"format": CLASSIFIER_FORMAT, "format_version": CLASSIFIER_FORMAT_VERSION, "info": dict(info),
                 "state_dict": state}, path)
