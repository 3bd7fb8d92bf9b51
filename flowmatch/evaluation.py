"""Evaluation: what "sample quality" means for a task, and :func:`evaluate`, the end-of-training
evaluation of toy and image models alike. The scorers here are shared by training's evaluation, the
bench and reflow.

Toy tasks score samples by exact W2 and MMD against a fresh evaluation reference of the target
(:class:`flowmatch.bench.ToyScorer`; ``target.reference``: a mixture's components in exact shares,
see :mod:`flowmatch.data.toy`).
Image tasks score them in the feature space of a small classifier trained on the same dataset
(:class:`flowmatch.bench.ImageScorer`): Fréchet distance and KID against the training split; the
floor is the test split's FD to the same reference (real held-out images of that size);
``fd_test`` is the samples' FD against the test split. A generator that copies training images
scores a low ``fd`` (it can beat the floor) but not a low ``fd_test``; :func:`image_memorisation`
says whether samples sit closer to training images than held-out images do
(:mod:`flowmatch.metrics.memorisation`). A class-conditional model is sampled with labels
``0, 1, ..., K - 1, 0, 1, ...`` (balanced classes) and classifier-free guidance of ``eval.guidance``.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from flowmatch.bench import ImageScorer, ToyScorer, ValidationImageScorer
from flowmatch.config import ExperimentConfig
from flowmatch.data.task import build_task, is_image_task
from flowmatch.distill import adversarial
from flowmatch.errors import FlowmatchError
from flowmatch.metrics import straightness
from flowmatch.models import ClassifierFreeGuidance
from flowmatch.solvers import get_solver, solve
from flowmatch.io import atomic_save
from flowmatch.training import Tracker, read_metrics
from flowmatch.utils import make_generator

__all__ = ["LabeledField", "sampling_field", "make_scorer", "image_reference", "image_memorisation",
           "memorisation_checker", "inception_score_of", "straightness_n", "check_image_metric", "evaluate",
           "EVAL_KEYS", "IMAGE_EVAL_BATCH"]

IMAGE_EVAL_BATCH = 2000  # images per solve in the end-of-training evaluation
# the scores :func:`evaluate` reports (as ``eval/<key>``), per scorer metric, in the order it writes them
EVAL_KEYS = {"w2": ("w2", "w2_floor", "mmd"), "fd": ("fd", "kid", "fd_floor", "fd_floor_n", "fd_test")}


class LabeledField:
    """``v(x, t)`` of a class-conditional model for batches of up to ``len(labels)`` rows: a batch of
    ``B`` rows gets ``labels[:B]`` (so prefixes of one set of source draws keep their labels), with
    classifier-free guidance of ``scale``."""

    conditional = True  # the bench skips the likelihood of such fields

    def __init__(self, model, labels: torch.Tensor, scale: float = 1.0):
        self.model, self.labels, self.scale = model, labels, float(scale)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self.labels[: x.shape[0]].to(x.device)
        return ClassifierFreeGuidance(self.model, y, self.scale)(x, t)


def sampling_field(model, n: int, guidance: float = 1.0):
    """The field to integrate for ``n`` samples: ``model`` itself, or for a class-conditional model a
    :class:`LabeledField` with balanced labels ``i % K``."""
    k = getattr(model, "num_classes", None)
    if not k:
        return model
    return LabeledField(model, torch.arange(n) % k, guidance)


def image_reference(cfg, n: int, *, device: str | torch.device = "cpu"):
    """``(metrics, floor_images, held_out)`` for an image task: a
    :class:`~flowmatch.metrics.frechet.ImageFeatureMetrics` whose reference is the target's training
    split (at most ``max(n, 2000)`` images, a fixed subset), the test split's images (for the
    floor), and feature metrics of the same classifier whose reference is the whole test split
    (for ``fd_test``)."""
    from flowmatch.metrics.frechet import ImageFeatureMetrics

    train = build_task(cfg.data, split="train").target
    test = build_task(cfg.data, split="test").target
    xr, _ = train.tensors()
    cap = max(n, 2000)
    if len(xr) > cap:
        xr = xr[torch.randperm(len(xr), generator=torch.Generator().manual_seed(0))[:cap]]
    metrics = ImageFeatureMetrics(cfg.data.target, xr, path=cfg.eval.classifier, device=device)
    xt, _ = test.tensors()
    held_out = ImageFeatureMetrics(cfg.data.target, xt, classifier=metrics.classifier, device=device)
    return metrics, xt, held_out


def image_memorisation(cfg, x1: torch.Tensor, *, device: str | torch.device = "cpu") -> dict:
    """The memorisation check of image samples ``x1`` ``[M, C, H, W]``
    (:func:`flowmatch.metrics.memorisation.memorisation`): each sample's distance to its nearest
    training image (the whole training split) against the test split's, in pixel space and in the
    feature space of the task's classifier. Returns ``{"pixels": MemorisationResult, "features":
    MemorisationResult}``. To check several sample sets, build :func:`memorisation_checker` once."""
    return memorisation_checker(cfg, device=device)(x1)


def memorisation_checker(cfg, *, device: str | torch.device = "cpu") -> Callable[[torch.Tensor], dict]:
    """:func:`image_memorisation` for ``cfg``'s task with its splits and classifier loaded once:
    ``check(x1) -> {"pixels": MemorisationResult, "features": MemorisationResult}``."""
    from flowmatch.metrics.frechet import ImageFeatureMetrics
    from flowmatch.metrics.memorisation import MemorisationReference

    train, _ = build_task(cfg.data, split="train").target.tensors()
    test, _ = build_task(cfg.data, split="test").target.tensors()
    features = ImageFeatureMetrics(cfg.data.target, test, path=cfg.eval.classifier, device=device).features
    refs = {"pixels": MemorisationReference(train, test),
            "features": MemorisationReference(train, test, features=features)}

    def check(x1: torch.Tensor) -> dict:
        x1 = x1.detach().cpu()
        return {space: ref(x1) for space, ref in refs.items()}

    return check


def precision_recall_checker(cfg, *, k: int = 3, device: str | torch.device = "cpu"):
    """Improved precision and recall (:mod:`flowmatch.metrics.coverage`, ``k``-th neighbour balls) of image
    samples against ``cfg``'s whole training split in its classifier's feature space, the real side built
    once: ``check(x1) -> PrecisionRecall`` for samples ``[M, C, H, W]``."""
    from flowmatch.metrics.coverage import PrecisionRecallReference
    from flowmatch.metrics.frechet import ImageFeatureMetrics

    train, _ = build_task(cfg.data, split="train").target.tensors()
    features = ImageFeatureMetrics(cfg.data.target, train, path=cfg.eval.classifier, device=device).features
    ref = PrecisionRecallReference(train, k=k, features=features)
    return lambda x1: ref(x1.detach().cpu())


def class_balance_checker(cfg, *, threshold: float = 0.9, device: str | torch.device = "cpu"):
    """The class balance and ambiguous samples (:mod:`flowmatch.metrics.classes`) of image samples through
    ``cfg``'s task classifier, against the label frequencies of its whole training split: ``check(x1) ->
    ClassBalance`` for samples ``[M, C, H, W]``. A dataset without labels (an image folder) is a
    :class:`FlowmatchError` naming it."""
    from flowmatch.metrics.classes import ClassBalanceReference
    from flowmatch.metrics.frechet import load_feature_classifier

    _, labels = build_task(cfg.data, split="train").target.tensors()
    if labels is None:
        raise FlowmatchError(f"class balance: {cfg.data.target} has no labels to take class frequencies from")
    classifier = load_feature_classifier(cfg.data.target, cfg.eval.classifier, device=device)
    dev = next(classifier.parameters()).device
    ref = ClassBalanceReference(lambda x: classifier(x.to(dev, torch.float32)), labels, classifier.num_classes,
                                threshold=threshold)
    return lambda x1: ref(x1.detach())


def make_scorer(cfg, n: int, *, seed: int = 0, device: str | torch.device = "cpu"):
    """The bench scorer of ``cfg``'s task for rows of up to ``n`` samples."""
    if is_image_task(cfg.data):
        metrics, floor_images, held_out = image_reference(cfg, n, device=device)
        return ImageScorer(metrics, floor_images, seed, held_out)
    return ToyScorer(build_task(cfg.data).target, n, seed)


def validation_scorer(cfg, n: int, *, seed: int, device: str | torch.device = "cpu", quasi: bool = False):
    """The scorer a run selects its checkpoint with (APT's model selection): for a toy task the bench's
    scorer of ``seed`` (``n`` points against an exact-split reference of its own seed; with ``quasi``
    against the target's quasi-random draw of that seed, :class:`~flowmatch.bench.ToyScorer`); for an
    image task the classifier FD (and KID) against the ``val`` split, the training images held out of
    ``data.split=fit`` (never the test split, which reports ``fd_test``, nor the bench's reference;
    ``quasi`` changes nothing there); a run on ``data.split=fit`` is also scored for ``copies`` against
    its fit images (:class:`~flowmatch.bench.ValidationImageScorer`)."""
    if not is_image_task(cfg.data):
        return ToyScorer(build_task(cfg.data).target, n, seed, quasi=quasi)
    from flowmatch.metrics.frechet import ImageFeatureMetrics

    xv, _ = build_task(cfg.data, split="val").target.tensors()
    metrics = ImageFeatureMetrics(cfg.data.target, xv, path=cfg.eval.classifier, device=device)
    if cfg.data.split != "fit":  # the val images are training images there: no new images to compare with
        return ImageScorer(metrics, xv, seed)
    xf, _ = build_task(cfg.data, split="fit").target.tensors()
    return ValidationImageScorer(metrics, xv, xf, seed)


adversarial.VALIDATION_SCORERS["default"] = validation_scorer  # the APT objective's model selection scores with it


def straightness_n(image: bool) -> int:
    """Source draws the straightness is measured on: 128 images (a UNet's RK4 solve of 64 steps) or
    1,000 toy points."""
    return 128 if image else 1000


def inception_score_of(cfg, x1: torch.Tensor, *, device: str | torch.device = "cpu") -> Optional[float]:
    """Inception FID of samples ``x1`` against the training split when ``cfg.eval.inception`` names
    a local weights file; else None."""
    if not cfg.eval.inception:
        return None
    from flowmatch.metrics.frechet import inception_fid

    ref, _ = build_task(cfg.data, split="train").target.tensors()
    return inception_fid(x1, ref[: max(len(x1), 2000)], cfg.eval.inception, device=device)


def check_image_metric(cfg: ExperimentConfig) -> None:
    """Refuse, before training, an image task whose evaluation would have no feature classifier."""
    from flowmatch.metrics.frechet import SHIPPED_CLASSIFIERS, TRAIN_SCRIPT

    if cfg.eval.classifier is None and cfg.data.target not in SHIPPED_CLASSIFIERS:
        raise FlowmatchError(f"data.target={cfg.data.target}: no feature classifier ships for its Frechet distance; "
                             f"train one with {TRAIN_SCRIPT} --dataset {cfg.data.target} and set "
                             f"eval.classifier=PATH (shipped: {', '.join(SHIPPED_CLASSIFIERS)})")


@torch.no_grad()
def evaluate(model, cfg: ExperimentConfig, out_dir: Optional[str] = None, *,
             tracker: Optional[Tracker] = None, step: Optional[int] = None) -> dict:
    """Sample ``cfg.eval.n`` draws with the (EMA) ``model`` and score them with the task's scorer.

    Returns ``eval/w2``, ``eval/w2_floor``, ``eval/mmd`` (toy) or ``eval/fd``, ``eval/kid``,
    ``eval/fd_floor``, ``eval/fd_floor_n``, ``eval/fd_test`` (images; and ``eval/inception_fid`` with
    ``eval.inception``), then ``eval/nfe``, ``eval/solver``, ``eval/straightness`` and its relative
    and per-dimension forms (on :func:`straightness_n` draws). Toy samples are solved at once; images
    in chunks of :data:`IMAGE_EVAL_BATCH` (an adaptive solver steps each chunk on its own, so NFE is
    the largest over chunks). With ``out_dir``: ``samples.pt`` and, if ``cfg.eval.plots``,
    ``plots/samples.png``, ``plots/trajectories.png`` and ``plots/loss_by_t.png``.
    """
    ec = cfg.eval
    image = is_image_task(cfg.data)
    device = next(model.parameters()).device
    x0 = build_task(cfg.data).source.sample(ec.n, generator=make_generator(ec.seed)).to(device)  # [n, *D]
    field_ = sampling_field(model, ec.n, ec.guidance)
    solver = get_solver(ec.solver, atol=ec.atol, rtol=ec.rtol)
    nfe_arg = None if solver.adaptive else ec.nfe
    chunk = IMAGE_EVAL_BATCH if image else ec.n  # a big UNet on eval.n images at once would not fit a GPU
    chunks, nfe, xs = [], 0, None
    for start in range(0, ec.n, chunk):
        stop = min(start + chunk, ec.n)
        v = field_ if field_ is model else LabeledField(model, field_.labels[start:stop], field_.scale)
        traj = solve(v, x0[start:stop], solver, nfe=nfe_arg, return_trajectory=not image)
        chunks.append(traj.x1.float().cpu())
        nfe, xs = max(nfe, traj.nfe), traj.xs
    x1 = torch.cat(chunks)
    scorer = make_scorer(cfg, ec.n, seed=ec.seed, device=device)  # toy: reference seed ec.seed + 1, floor draw + 2
    scores = {**scorer.floor(ec.n), **scorer(x1)}  # the floor first: the toy scorer keeps its MMD reference
    st = straightness(field_, x0[: min(ec.n, straightness_n(image))])
    res = {**{f"eval/{k}": scores[k] for k in EVAL_KEYS[scorer.metric]}, "eval/nfe": nfe,
           "eval/solver": solver.name, "eval/straightness": st.straightness,
           "eval/straightness_rel": st.straightness_rel, "eval/straightness_per_dim": st.straightness_per_dim}
    fid = inception_score_of(cfg, x1, device=device) if image else None
    if fid is not None:
        res["eval/inception_fid"] = fid
    if tracker is not None:
        tracker.log({k: v for k, v in res.items() if not isinstance(v, str)}, step or 0)
    if out_dir is not None:
        atomic_save({"samples": x1, "x0": x0.cpu(), "solver": solver.name, "nfe": nfe},
                    os.path.join(out_dir, "samples.pt"))
        if ec.plots:
            pd = os.path.join(out_dir, "plots")
            if image:
                paths = _image_plots(model, field_, cfg, x0, x1, pd, f"{solver.name}, NFE {nfe}")
            else:
                paths = _toy_plots(cfg, x0, x1, xs, scorer.ref, pd, f"{solver.name}, NFE {nfe}", st.straightness_rel)
            _loss_by_t_plot(out_dir, paths)
            if tracker is not None:
                for key, p in paths.items():
                    tracker.log_image(f"eval/{key}", p, step)
    return res


def _toy_plots(cfg, x0, x1, xs, ref, pd: str, how: str, s_rel: float) -> dict:
    """Samples beside the source and target draws; the evaluation solve's trajectories."""
    from flowmatch.viz import plot_samples, plot_trajectories

    return {"samples": plot_samples({"source (t=0)": x0.cpu(), f"model ({how})": x1, "target": ref},
                                    os.path.join(pd, "samples.png"), title=cfg.name, target=ref),
            "trajectories": plot_trajectories(xs, os.path.join(pd, "trajectories.png"), target=ref, source=x0,
                                              title=f"{cfg.name}: S/E|Z1-Z0|^2 = {s_rel:.3g}")}


def _image_plots(model, field_, cfg, x0, x1, pd: str, how: str) -> dict:
    """A grid of the first 64 samples (one class a column); RK4 trajectories of 8 draws."""
    from flowmatch.viz import plot_image_trajectories, save_image_grid

    k = getattr(model, "num_classes", None) or 8
    paths = {"samples": save_image_grid(x1[:64], os.path.join(pd, "samples.png"), nrow=k if k <= 16 else 8,
                                        title=f"{cfg.name}: {how}")}
    xs = solve(field_, x0[:8], "rk4", num_steps=16, return_trajectory=True).xs
    paths["trajectories"] = plot_image_trajectories({cfg.name: xs}, os.path.join(pd, "trajectories.png"),
                                                    n=8, steps=9, title=f"{cfg.name}: RK4 trajectories")
    return paths


def _loss_by_t_plot(out_dir: str, paths: dict) -> None:
    """The last logged loss per t-bin (``metrics.jsonl``), when training logged one."""
    from flowmatch.viz import plot_loss_by_t

    rows = [r for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if "train/loss_t0" in r]
    if rows:
        last = rows[-1]
        bins = [last.get(f"train/loss_t{i}", float("nan")) for i in range(10)]
        paths["loss_by_t"] = plot_loss_by_t(bins, os.path.join(out_dir, "plots", "loss_by_t.png"),
                                            title=f"loss by t at step {last['step']}")
