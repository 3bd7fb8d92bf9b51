"""The image counterpart of ``experiments/toy/paired_w2.py``: a few-step table's image models on the same noise.

The few-step table scores each image model on one draw of source noise (``reflow.bench_n`` samples, the
bench's seed). Between draws a 1,000-sample Fréchet distance moves by a few percent, as much as the gaps
the table is read for (an any-step model's one jump against the distilled model's one step). This script
scores every entry on the same ``--draws`` draws of ``--n`` noise samples (seeds ``--seed + i``), by the
bench's two FDs in the task classifier's feature space: ``fd`` against the training images (the bench's
reference, :func:`flowmatch.evaluation.image_reference`) and ``fd_test`` against the held-out test split.
It prints each draw, the mean and sd of every entry, and per entry its paired ratio to the one-step
student (mean over draws of entry / student, with the standard error of that mean) and its paired
difference, and the same against the teacher (``vs_teacher``). With ``--memorisation`` every sample set
also gets the memorisation check (:func:`flowmatch.evaluation.image_memorisation`: the fraction of
samples nearer a training image than 95% of the held-out test images are, ``copies``, 0.05 expected), in
pixels and in the classifier's features, with ``--precision-recall`` the improved precision and recall
against the training images (:func:`flowmatch.evaluation.precision_recall_checker`: the share of samples
inside the training images' support, and of training images inside the samples'), with ``--fd-terms``
``fd``'s two parts (:meth:`~flowmatch.metrics.frechet.ImageFeatureMetrics.fd_terms`): ``fd_mean``, the
squared distance between the feature means, and ``fd_cov``, what the covariances add, and with ``--classes``
the class structure the classifier reads (:func:`flowmatch.evaluation.class_balance_checker`): ``class_tv``,
the total variation distance between the samples' class shares and the training labels' frequencies, and
``ambiguous``, the share of samples whose top class probability is below 0.9; the held-out test images'
own values are written beside them (``reference``), what new real images score; all paired the same way::

    python experiments/images/paired_fd.py runs/images/digits --student 2-RF+distill \\
        --also 2-RF:euler:1 --also 2-RF+Meanflow:anystep:1 --also 2-RF+Meanflow:anystep:2 --draws 10

Entries as in ``paired_w2.py``: ``STAGE:ADAPTIVE`` (at the config's ``eval.atol`` / ``eval.rtol``) or
``STAGE:SOLVER:NFE`` (an any-step model's jumps: ``2-RF+Shortcut:anystep:4``), a stage of the run or a
checkpoint file. The teacher (``--teacher``, dopri5) is scored too unless ``--teacher none``.
Writes ``paired_fd.json`` in the run directory (or ``--out``), atomically.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

from flowmatch.data.task import build_task, is_image_task
from flowmatch.evaluation import (class_balance_checker, image_reference, memorisation_checker,
                                  precision_recall_checker)
from flowmatch.solvers import get_solver, solve
from flowmatch.training.checkpoint import load_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "toy"))
from paired_w2 import also_entries, paired_arguments, write_paired  # noqa: E402  (shared with the toy script)

STUDENT = "student euler 1"


def paired(values: list[float], base: list[float]) -> dict:
    """Mean and standard error of the per-draw ratio ``values / base`` (``None`` where a ``base`` is 0, as a
    fraction of copies can be) and difference ``values - base``."""
    diff = [v - b for v, b in zip(values, base)]
    se = (lambda xs: statistics.stdev(xs) / math.sqrt(len(xs)))
    out = {"ratio": None, "ratio_se": None, "diff": statistics.mean(diff), "diff_se": se(diff)}
    if all(b != 0 for b in base):
        ratio = [v / b for v, b in zip(values, base)]
        out |= {"ratio": statistics.mean(ratio), "ratio_se": se(ratio)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="an image few-step table's or reflow chain's task directory (holds its stages)")
    p.add_argument("--memorisation", action="store_true",
                   help="score each sample set's memorisation check too (copies_pixels, copies_features)")
    p.add_argument("--precision-recall", action="store_true",
                   help="score each sample set's improved precision and recall against the training images too "
                        "(classifier features, k = 3)")
    p.add_argument("--fd-terms", action="store_true",
                   help="score fd's two parts too: the feature means' (fd_mean) and the covariances' (fd_cov)")
    p.add_argument("--classes", action="store_true",
                   help="score the class structure too: the class shares' distance to the training labels' "
                        "(class_tv) and the share of samples the classifier is below 0.9 sure of (ambiguous)")
    args = paired_arguments(p, student="2-RF+distill", n=1000, out="paired_fd.json",
                            teacher_help="the teacher's stage or checkpoint (dopri5), or none")

    def ckpt(stage: str) -> str:
        path = stage if os.path.isfile(stage) else os.path.join(args.run, stage, "checkpoints", "last.pt")
        if not os.path.isfile(path):
            raise SystemExit(f"{stage}: no checkpoint at {path} (a stage of {args.run} or a checkpoint file)")
        return path

    entries = [(STUDENT, args.student, "euler", 1)]
    if args.teacher != "none":
        entries.append(("teacher dopri5", args.teacher, "dopri5", None))
    entries += also_entries(args.also)
    models = {key: load_model(ckpt(stage)) for key, stage, _, _ in entries}
    cfg = models[STUDENT].config
    if not is_image_task(cfg.data):
        raise SystemExit(f"{args.run}: {cfg.name} is a toy task; score it with experiments/toy/paired_w2.py")
    source = build_task(cfg.data).source
    metrics, test_images, held_out = image_reference(cfg, args.n)
    check = memorisation_checker(cfg) if args.memorisation else None
    coverage = precision_recall_checker(cfg) if args.precision_recall else None
    classes = class_balance_checker(cfg) if args.classes else None
    extra = {}
    if classes is not None:  # what new real images score: the held-out test split itself
        real = classes(test_images)
        extra["reference"] = {"test images": {"n": real.n_samples, "class_tv": real.class_tv,
                                              "ambiguous": real.ambiguous}}
        print(f"test images ({real.n_samples}): class_tv {real.class_tv:.4f}, ambiguous {real.ambiguous:.4f}")
    names = ["fd", "fd_test"] + (["copies_pixels", "copies_features"] if args.memorisation else []) + \
        (["precision", "recall"] if args.precision_recall else []) + \
        (["fd_mean", "fd_cov"] if args.fd_terms else []) + (["class_tv", "ambiguous"] if args.classes else [])
    scores = {key: {m: [] for m in names} for key, *_ in entries}
    # each solve starts its own state (a consistency sampler re-seeds its noise), so one solver an entry serves every draw
    solvers = {key: get_solver(solver, atol=cfg.eval.atol, rtol=cfg.eval.rtol).for_source(source)
               for key, _, solver, _ in entries}
    with torch.no_grad():
        for i in range(args.draws):
            x0 = source.sample(args.n, generator=torch.Generator().manual_seed(args.seed + i))
            for key, _, _, nfe in entries:
                x1 = solve(models[key].model.eval(), x0, solvers[key], **({} if nfe is None else {"nfe": nfe})).x1
                scores[key]["fd"].append(metrics.fd(x1))
                scores[key]["fd_test"].append(held_out.fd(x1))
                if check is not None:
                    for space, r in check(x1).items():
                        scores[key][f"copies_{space}"].append(r.copies_fraction)
                if args.fd_terms:
                    means, covs = metrics.fd_terms(x1)
                    scores[key]["fd_mean"].append(means)
                    scores[key]["fd_cov"].append(covs)
                if coverage is not None:
                    pr = coverage(x1)
                    scores[key]["precision"].append(pr.precision)
                    scores[key]["recall"].append(pr.recall)
                if classes is not None:
                    cb = classes(x1)
                    scores[key]["class_tv"].append(cb.class_tv)
                    scores[key]["ambiguous"].append(cb.ambiguous)
            print(f"draw {i}: " + ", ".join(f"{k} {v['fd'][-1]:.4f}" for k, v in scores.items()), flush=True)
    summary = {}
    for key, sc in scores.items():
        summary[key] = {m: {"mean": statistics.mean(v), "sd": statistics.stdev(v)} for m, v in sc.items()}
        for base, name in ((STUDENT, "vs_student"), ("teacher dopri5", "vs_teacher")):
            if key != base and base in scores:
                for m in names:
                    summary[key][m] |= {name: paired(sc[m], scores[base][m])}
    for key, s in summary.items():
        line = f"{key}: fd {s['fd']['mean']:.4f} (sd {s['fd']['sd']:.4f}), fd_test {s['fd_test']['mean']:.4f}"
        if "vs_student" in s["fd"]:
            r = s["fd"]["vs_student"]
            line += f"; fd / student {r['ratio']:.3f} +- {r['ratio_se']:.3f} (paired)"
        if "vs_teacher" in s["fd"]:
            line += "; minus the teacher: " + ", ".join(
                f"{m} {s[m]['vs_teacher']['diff']:+.4f} +- {s[m]['vs_teacher']['diff_se']:.4f}" for m in names)
        print(line)
    write_paired(args, "paired_fd.json", scores, summary, extra)


if __name__ == "__main__":
    main()
