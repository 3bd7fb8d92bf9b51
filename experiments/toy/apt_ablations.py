"""Ablations of adversarial post-training (APT) on a toy task of a reflow chain.

Trains APT from the chain's distilled one-step model (``--student``, default ``2-RF+distill``) with a
base setting (``--set section.key=value``, repeatable) and with one change at a time: without R1,
exact R1 in place of the approximated one, with the regression onto the chain's pair store
(``--pairs``, default ``pairs-2RF``), with a randomly initialised discriminator in place of the 1-RF
teacher's weights, and with a second batch size (``--batch2``)::

    python experiments/toy/apt_ablations.py runs/reflow/noise_to_moons --steps 400 --out runs/apt_ablations/moons

Each variant keeps the checkpoint that scored best on APT's own validation draw (``best.pt``, seed
``VALIDATION_SEED`` of :mod:`flowmatch.distill.adversarial`); that checkpoint and the start are then
scored on the same held-out draws (``--draws`` draws of ``--n`` points from seed ``--seed`` on: the
source, an exact-split evaluation reference and, for the noise floor, an i.i.d. target draw), and
the table gives the paired difference ``best - start`` with its standard error (sd / sqrt(draws)).
Selection never sees these draws. Each run's ``metrics.jsonl`` is read for the failure modes:
``non-finite`` (a loss that is not a number), ``D wins`` (the discriminator's loss falls below
``D_WINS``: it separates real from generated and the generator's gradient saturates), ``G explodes``
(the generator's loss above ``G_EXPLODES``) and ``D at chance`` (over the second half of the run the
discriminator's mean logit on real rows exceeds that on generated rows by less than ``CHANCE_GAP``:
no signal reaches the generator). The gap, not the loss, is read: a discriminator that gives both
the same logit ``a != 0`` has a loss ``softplus(-a) + softplus(a)`` above 2 ln 2 and is still at
chance (the full-size moons runs sat at d_loss 1.40 with ``d_real = d_fake``).
Writes ``apt_ablations.json`` and ``apt_ablations.md`` to ``--out`` (atomically) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

import flowmatch.evaluation  # noqa: F401 - registers APT's validation scorer
from flowmatch.bench import rows_to_markdown
from flowmatch.config import apply_overrides, load_config
from flowmatch.data.task import build_task
from flowmatch.io import atomic_write_text
from flowmatch.metrics.distances import w2
from flowmatch.distill.adversarial import one_step
from flowmatch.training import load_checkpoint, train
from flowmatch.training.checkpoint import load_model
from flowmatch.training.tracking import read_metrics

D_WINS = 0.1  # d_loss below this: the discriminator separates the two (2 ln 2 = 1.386 is chance)
G_EXPLODES = 10.0  # g_loss above this: softplus(-D(fake)) of a discriminator sure of every fake
CHANCE_GAP = 0.05  # d_real - d_fake (mean logits) below this over the second half: no signal
CHANCE_TOL = 0.01  # |d_loss - 2 ln 2| below this: at chance, for rows without the logits


def variants(run: str, batch2: int, pairs: str) -> dict[str, list[str]]:
    """Variant name -> the overrides it adds to the base setting."""
    return {
        "base": [],
        "no R1": ["apt.r1=none"],
        "exact R1": ["apt.r1=exact"],
        "+ regression": ["apt.regression_weight=1.0", "coupling.name=paired",
                         f"coupling.pairs={os.path.join(run, pairs)}", "coupling.mix=1.0"],
        "random D": ["apt.discriminator_init=random"],
        f"batch {batch2}": [f"train.batch_size={batch2}"],
    }


def flags(rows: list[dict]) -> list[str]:
    """The failure modes (see the module docstring) shown by a run's metrics rows."""
    d = [r["apt/d_loss"] for r in rows if "apt/d_loss" in r]
    g = [r["apt/g_loss"] for r in rows if "apt/g_loss" in r]
    out = []
    if any(not math.isfinite(v) for v in d + g):
        out.append("non-finite")
    if d and min(d) < D_WINS:
        out.append("D wins")
    if g and max(g) > G_EXPLODES:
        out.append("G explodes")
    rows_d = [r for r in rows if "apt/d_loss" in r]
    half = rows_d[len(rows_d) // 2:]
    if half and all(r["apt/d_real"] - r["apt/d_fake"] < CHANCE_GAP if "apt/d_real" in r and "apt/d_fake" in r
                    else abs(r["apt/d_loss"] - 2 * math.log(2)) < CHANCE_TOL for r in half):
        out.append("D at chance")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a reflow chain's output directory (1-RF/, the student's stage, the pair store)")
    p.add_argument("--student", default="2-RF+distill", help="the one-step stage (default 2-RF+distill)")
    p.add_argument("--teacher", default="1-RF", help="the discriminator's initialisation (default 1-RF)")
    p.add_argument("--pairs", default="pairs-2RF", help="the pair store of the regression variant")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--batch2", type=int, default=2048)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="the base setting (e.g. apt.lr_d=1e-3), applied to every variant")
    p.add_argument("--only", action="append", default=None, help="run only these variants (repeatable)")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--out", required=True, help="the directory of the runs and the table")
    args = p.parse_args()
    if args.draws < 2:
        p.error(f"--draws {args.draws}: give at least 2 (a standard error needs two)")

    stage = lambda name: os.path.join(args.run, name)  # noqa: E731
    start_ckpt = os.path.join(stage(args.student), "checkpoints", "last.pt")
    base = load_config(os.path.join(stage(args.student), "config.yaml"), [
        "train.objective=apt", f"train.init={start_ckpt}",
        f"apt.discriminator_init={os.path.join(stage(args.teacher), 'checkpoints', 'last.pt')}",
        "train.grad_clip=0", "train.warmup_steps=0", "train.lr_schedule=constant", f"train.steps={args.steps}",
        f"apt.steps={args.steps}", f"train.batch_size={args.batch}", "coupling.name=independent",
        "coupling.pairs=null", "tracking.mode=disabled", f"train.ckpt_every={args.steps}"] + args.overrides)
    todo = variants(args.run, args.batch2, args.pairs)
    unknown = sorted(set(args.only or []) - set(todo))
    if unknown:
        p.error(f"--only {', '.join(unknown)}: not a variant (variants: {', '.join(todo)})")
    todo = {k: v for k, v in todo.items() if not args.only or k in args.only}

    runs = {}
    for name, extra in todo.items():
        cfg = apply_overrides(base, extra)
        out_dir = os.path.join(args.out, name.replace(" ", "_").replace("+", "plus"))
        t0 = time.perf_counter()
        train(cfg, out_dir, overwrite=True, progress=False)
        seconds = time.perf_counter() - t0
        best_path = os.path.join(out_dir, "checkpoints", "best.pt")
        selection = load_checkpoint(best_path).get("selection") or {}
        runs[name] = {"dir": out_dir, "seconds": seconds, "selection": selection,
                      "flags": flags(read_metrics(os.path.join(out_dir, "metrics.jsonl")))}
        print(f"{name}: trained in {seconds:.0f} s, best at step {selection.get('step')} "
              f"(validation {selection.get('metric')} {selection.get('score', float('nan')):.4f}); "
              f"{', '.join(runs[name]['flags']) or 'no failure flag'}", flush=True)

    # score the start and every variant's best.pt on the same held-out draws
    models = {"start": load_model(start_ckpt).model.eval()}
    for name, r in runs.items():
        models[name] = load_model(os.path.join(r["dir"], "checkpoints", "best.pt")).model.eval()
    task = build_task(base.data)
    scores = {k: [] for k in (*models, "floor")}
    with torch.no_grad():
        for i in range(args.draws):
            g = torch.Generator().manual_seed(args.seed + i)
            x0 = task.source.sample(args.n, generator=g)
            y, y2 = task.target.reference(args.n, generator=g), task.target.sample(args.n, generator=g)
            for k, m in models.items():
                scores[k].append(w2(one_step(m, x0), y))
            scores["floor"].append(w2(y2, y))
    floor = statistics.mean(scores["floor"])
    rows = []
    for name, r in runs.items():
        diff = [b - s for b, s in zip(scores[name], scores["start"])]
        sd = statistics.stdev(diff)
        rows.append({"variant": name, "best_step": r["selection"].get("step"),
                     "val_w2": r["selection"].get("score"), "w2": statistics.mean(scores[name]),
                     "w2/floor": statistics.mean(scores[name]) / floor,
                     "best-start": statistics.mean(diff), "se": sd / math.sqrt(args.draws),
                     "flags": ", ".join(r["flags"]) or "-", "seconds": r["seconds"]})
    rows.append({"variant": "start", "w2": statistics.mean(scores["start"]),
                 "w2/floor": statistics.mean(scores["start"]) / floor})
    table = rows_to_markdown(rows, ["variant", "best_step", "val_w2", "w2", "w2/floor", "best-start", "se",
                                    "flags", "seconds"])
    print(table)
    print(f"floor {floor:.4f}; {args.draws} held-out draws of {args.n} from seed {args.seed}")
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "apt_ablations.md"), table + "\n")
    atomic_write_text(os.path.join(args.out, "apt_ablations.json"), json.dumps(
        {"run": args.run, "student": args.student, "teacher": args.teacher, "steps": args.steps,
         "batch": args.batch, "batch2": args.batch2, "overrides": args.overrides, "draws": args.draws,
         "n": args.n, "seed": args.seed, "floor": floor, "scores": scores, "runs": runs, "rows": rows}, indent=2))
    print(f"wrote {os.path.join(args.out, 'apt_ablations.json')}")


if __name__ == "__main__":
    main()
