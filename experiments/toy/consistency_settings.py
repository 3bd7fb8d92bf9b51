"""Choose consistency distillation's settings on a validation draw (not on the draw the table reports).

Trains CD from a 1-RF teacher for each combination of the given learning rates, target EMA decays
(mu) and grid sizes (N), for the same number of steps, and scores each student's one-step and
two-step (re-noised at t1 = 0.5) W2 on validation draws: source and reference seeds of their own
(10 draws of n points by default, so the spread between draws is printed beside each mean)::

    python experiments/toy/consistency_settings.py experiments/toy/reflow_noise_to_moons.yaml \\
        runs/reflow/noise_to_moons/1-RF/checkpoints/last.pt --lr 1e-4,1e-3 --mu 0,0.95 --num-steps 16 --steps 3000

Writes ``consistency_settings.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import torch

from flowmatch.bench import rows_to_markdown
from flowmatch.config import load_config
from flowmatch.data.task import build_task
from flowmatch.io import atomic_write_text
from flowmatch.metrics.distances import w2
from flowmatch.solvers import get_solver
from flowmatch.training import build_trainer
from flowmatch.utils import make_generator

VALIDATION_SEED = 20_000  # neither the bench's (0) nor paired_w2's (10,000) nor eval's (1234)


def _floats(v: str) -> list[float]:
    return [float(x) for x in v.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("teacher", help="the 1-RF checkpoint CD distils (and starts from)")
    p.add_argument("--lr", type=_floats, default=[1e-4, 1e-3])
    p.add_argument("--mu", type=_floats, default=[0.0, 0.95])
    p.add_argument("--num-steps", type=lambda v: [int(x) for x in v.split(",")], default=[16])
    p.add_argument("--loss", default="pseudo_huber")
    p.add_argument("--teacher-solver", default="euler", choices=["euler", "heun"])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--out", default=os.path.join("runs", "consistency_settings"))
    args = p.parse_args()
    task = build_task(load_config(args.config).data)
    rows = []
    for lr, mu, n_int in itertools.product(args.lr, args.mu, args.num_steps):
        cfg = load_config(args.config, ["tracking.mode=disabled", "train.objective=cd", f"train.init={args.teacher}",
                                        f"train.steps={args.steps}", f"train.loss={args.loss}", f"train.lr={lr}",
                                        f"consistency.mu={mu}", f"consistency.num_steps={n_int}",
                                        f"consistency.teacher_solver={args.teacher_solver}"])
        t0 = time.perf_counter()
        tr = build_trainer(cfg)
        tr.run(args.steps)
        tr.sync()
        model = tr.ema.model.eval()
        one, two = [], []
        with torch.no_grad():
            for d in range(args.draws):
                x0 = task.source.sample(args.n, generator=make_generator(VALIDATION_SEED + d))
                ref = task.target.reference(args.n, generator=make_generator(VALIDATION_SEED + 1000 + d))
                one.append(w2(get_solver("euler").integrate(model, x0, torch.tensor([0.0, 1.0])).x1, ref))
                sampler = get_solver("consistency").for_source(task.source)  # re-noised with source draws
                two.append(w2(sampler.integrate(model, x0, torch.tensor([0.0, 0.5, 1.0])).x1, ref))
        rows.append({"lr": lr, "mu": mu, "num_steps": n_int, "teacher_solver": args.teacher_solver, "steps": args.steps,
                     "w2 1 step": statistics.mean(one), "sd 1": statistics.stdev(one) if len(one) > 1 else 0.0,
                     "w2 2 steps": statistics.mean(two), "sd 2": statistics.stdev(two) if len(two) > 1 else 0.0,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "consistency_settings.json"), json.dumps(rows, indent=1))
    atomic_write_text(os.path.join(args.out, "consistency_settings.md"), rows_to_markdown(rows))
    print(rows_to_markdown(rows), end="")


if __name__ == "__main__":
    main()
