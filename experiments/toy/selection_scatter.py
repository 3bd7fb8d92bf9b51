"""How finely can a validation draw tell two checkpoints of one-step generators apart?

Model selection (APT's ``best.pt``) compares checkpoints of one run on the same validation draws; what
matters is the scatter of the paired difference between two checkpoints' scores, draw to draw. This
scores one-step models (Euler, NFE 1; the first is the base) on ``--draws`` draws of ``--n`` points in
three ways and prints, per model, the mean score and the paired difference to the base with its
standard deviation and standard error:

- ``iid``: i.i.d. source points against an exact-split reference (``target.reference``), as the
  held-out scoring and ``apt.eval_noise=iid`` do;
- ``quasi source``: the source's quasi-random draw (``source.quasi``) against the same reference;
- ``quasi``: quasi-random source points against the target's quasi-random draw, as
  ``apt.eval_noise=quasi`` does.

::

    python experiments/toy/selection_scatter.py runs/reflow/noise_to_8gaussians \
        runs/reflow/noise_to_8gaussians/2-RF+distill/checkpoints/last.pt other/checkpoints/best.pt

Draw ``i`` uses seed ``--seed + i`` (default 50,000: none of the held-out, validation or bench seeds).
Writes ``--out`` (JSON, atomically) when given.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from concurrent.futures import ThreadPoolExecutor

import torch

from flowmatch.data.task import build_task
from flowmatch.distill.adversarial import one_step
from flowmatch.io import atomic_write_text
from flowmatch.metrics.distances import w2
from flowmatch.training.checkpoint import load_model

MODES = ("iid", "quasi source", "quasi")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a reflow chain's output directory (for the report only)")
    p.add_argument("checkpoints", nargs="+", help="one-step checkpoints; the first is the base of the differences")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--seed", type=int, default=50_000)
    p.add_argument("--out", help="a JSON file to write")
    args = p.parse_args()
    if args.draws < 2 or len(args.checkpoints) < 2:
        p.error("give at least 2 draws and 2 checkpoints (a paired standard deviation needs both)")
    loaded = [load_model(c) for c in args.checkpoints]
    models = [m.model.eval() for m in loaded]
    task = build_task(loaded[0].config.data)
    source, target = task.source, task.target
    scores = {m: [[] for _ in models] for m in MODES}
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool, torch.no_grad():
        for i in range(args.draws):
            seed = args.seed + i
            g = torch.Generator().manual_seed(seed)
            x0, ref = source.sample(args.n, generator=g), target.reference(args.n, generator=g)
            xq, refq = source.quasi(args.n, seed=seed), target.quasi(args.n, seed=seed + 1)
            for mode, src, y in (("iid", x0, ref), ("quasi source", xq, ref), ("quasi", xq, refq)):
                futures = [pool.submit(w2, one_step(m, src), y) for m in models]
                for k, f in enumerate(futures):
                    scores[mode][k].append(f.result())
    summary = {}
    for mode in MODES:
        base = scores[mode][0]
        rows = []
        for k, path in enumerate(args.checkpoints):
            diff = [a - b for a, b in zip(scores[mode][k], base)]
            sd = statistics.stdev(diff)
            rows.append({"checkpoint": path, "mean": statistics.mean(scores[mode][k]),
                         "diff_mean": statistics.mean(diff), "diff_sd": sd, "diff_se": sd / math.sqrt(len(diff))})
            if k:
                print(f"{mode:>12}: {path}: mean {rows[-1]['mean']:.4f} (base {statistics.mean(base):.4f}), "
                      f"paired difference {rows[-1]['diff_mean']:+.4f}, sd {sd:.4f}, se {rows[-1]['diff_se']:.4f}")
        summary[mode] = rows
    if args.out:
        atomic_write_text(args.out, json.dumps({"run": args.run, "checkpoints": args.checkpoints, "n": args.n,
                                                "draws": args.draws, "seed": args.seed, "scores": scores,
                                                "summary": summary}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
