"""Choose an any-step model's settings (shortcut or MeanFlow) on validation draws, not on the table's.

Trains the few-step table's any-step stage (:func:`flowmatch.few_step.anystep_stage`: from the weights of
the flow checkpoint given, the chain's 1-RF teacher or its 2-RF, on real data, the section's ``steps`` and
``lr`` unless ``--steps`` / ``--set`` change them) for every combination of the ``--grid`` values, and scores each network's jumps at
``--nfes`` on validation draws of their own seeds (``--draws`` draws of ``--n`` points: the source
from ``VALIDATION_SEED + i``, an exact-split reference from ``VALIDATION_SEED + 1000 + i``), so the
spread between draws is printed beside each mean; ``--baseline CKPT`` (repeatable) scores a one-step
model (one Euler step: a distilled or consistency model) on the same draws, the mark a one-jump any-step
model is held to. A setting is ``monotone`` when its mean W2 does not
rise from one budget to the next by more than two standard errors of the paired difference::

    python experiments/toy/anystep_settings.py experiments/toy/reflow_noise_to_moons.yaml \\
        runs/reflow/noise_to_moons/1-RF/checkpoints/last.pt --method meanflow --grid meanflow.power=0,0.5,1

Writes ``anystep_settings.json`` and ``.md`` to ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time

import torch

from flowmatch.bench import rows_to_markdown
from flowmatch.config import load_config
from flowmatch.data.task import build_task
from flowmatch.distill.anystep import ANYSTEP_FAMILIES, sample_anystep
from flowmatch.few_step import anystep_stage
from flowmatch.io import atomic_write_text
from flowmatch.metrics.distances import w2
from flowmatch.solvers import get_solver
from flowmatch.training import build_trainer, load_model
from flowmatch.utils import make_generator

# none of the bench's (0, 1, 2), paired_w2's (10,000 on), consistency_settings' (20,000 on), APT's
# validation (20,011) or the few-step table's validation (10,007)
VALIDATION_SEED = 30_000


def _grid(items: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SystemExit(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. meanflow.power=0,0.5,1)")
        out.append((key, values.split(",")))
    return out


def monotone(scores: dict[int, list[float]]) -> bool:
    """Whether the mean score never rises from one budget to the next by more than two standard errors
    of the paired difference (``scores``: NFE -> per-draw scores, the same draws at every NFE)."""
    nfes = sorted(scores)
    for a, b in zip(nfes, nfes[1:]):
        diff = [y - x for x, y in zip(scores[a], scores[b])]
        se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if statistics.mean(diff) > 2 * se:
            return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("teacher", help="the flow checkpoint the any-step model starts from (1-RF, or 2-RF as the "
                                   "table's start: 2-RF); with velocity: teacher, its velocity is the flow target")
    p.add_argument("--method", required=True, choices=ANYSTEP_FAMILIES)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values (repeatable: every combination is trained)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="applied to every setting (e.g. meanflow.steps=3000)")
    p.add_argument("--baseline", action="append", default=[], metavar="CKPT",
                   help="a one-step model scored by one Euler step on the same draws (repeatable)")
    p.add_argument("--nfes", default="1,2,4,8")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--out", default=os.path.join("runs", "anystep_settings"))
    args = p.parse_args()
    if args.draws < 2:
        p.error(f"--draws {args.draws}: give at least 2 (a standard error needs two)")
    nfes = [int(v) for v in args.nfes.split(",")]
    grid = _grid(args.grid)
    base = load_config(args.config, args.overrides)
    task = build_task(base.data)
    draws = []
    for i in range(args.draws):
        draws.append((task.source.sample(args.n, generator=make_generator(VALIDATION_SEED + i)),
                      task.target.reference(args.n, generator=make_generator(VALIDATION_SEED + 1000 + i))))
    rows = []
    for path in args.baseline:
        model = load_model(path).model.eval()
        with torch.no_grad():
            one = [w2(get_solver("euler").integrate(model, x0, torch.tensor([0.0, 1.0])).x1, ref) for x0, ref in draws]
        rows.append({"baseline": path, "w2 nfe 1": statistics.mean(one), "sd 1": statistics.stdev(one),
                     "scores": {1: one}})
        print({k: v for k, v in rows[-1].items() if k != "scores"}, flush=True)
    for values in itertools.product(*(v for _, v in grid)):
        setting = [f"{k}={v}" for (k, _), v in zip(grid, values)]
        cfg = load_config(args.config, args.overrides + setting + ["tracking.mode=disabled"])
        stage = anystep_stage(cfg, args.method, args.teacher)
        t0 = time.perf_counter()
        tr = build_trainer(stage)
        tr.run(stage.train.steps)
        tr.sync()
        model = tr.ema.model.eval()
        scores: dict[int, list[float]] = {k: [] for k in nfes}
        with torch.no_grad():
            for x0, ref in draws:
                for k in nfes:
                    scores[k].append(w2(sample_anystep(model, x0, k, family=args.method).x1, ref))
        row = dict(zip((k for k, _ in grid), values)) | {"steps": stage.train.steps}
        for k in nfes:
            row[f"w2 nfe {k}"] = statistics.mean(scores[k])
            row[f"sd {k}"] = statistics.stdev(scores[k])
        row |= {"monotone": monotone(scores), "seconds": round(time.perf_counter() - t0, 1), "scores": scores}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "scores"}, flush=True)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "anystep_settings.json"), json.dumps(
        {"config": args.config, "teacher": args.teacher, "method": args.method, "overrides": args.overrides,
         "draws": args.draws, "n": args.n, "seed": VALIDATION_SEED, "rows": rows}, indent=1))
    shown = [{k: v for k, v in r.items() if k != "scores"} for r in rows]
    table = rows_to_markdown(shown, list(dict.fromkeys(k for r in shown for k in r)))  # every row's keys
    atomic_write_text(os.path.join(args.out, "anystep_settings.md"), table)
    print(table, end="")


if __name__ == "__main__":
    main()
