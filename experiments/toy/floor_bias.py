"""Is the W2 of n points minimised by the target itself? Perturbations of perfect 8gaussians draws, paired.

Each draw of n target points (at i.i.d. uniform quantiles, ``ToyDistribution.at_quantiles``) is scored
against an exact-split reference as it is, with its modes widened (its Gaussian noise scaled up), and
with a share of its points moved onto bridges between neighbouring modes (a point of mode k placed at a
uniform angle up to half-way towards mode k +- 1 on the circle of modes, with 0.3 of its noise). Every
variant reuses the draw's quantiles and noise, so the differences to the unperturbed draw are paired::

    python experiments/toy/floor_bias.py --draws 8 --n 5000 --out runs/floor/floor_bias.json
    python experiments/toy/floor_bias.py --quasi --draws 6 --n 5000 --out runs/floor/floor_bias_quasi.json

A perturbation that lowers the W2 is one the W2 at this n rewards: a model with it can score below the
noise floor without being nearer the target. ``--quasi`` scores quasi-random draws against a quasi-random
reference instead (both with exact shares, seeds ``seed + 2i`` and ``seed + 2i + 1``), as APT's validation
does (``apt.eval_noise=quasi``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from flowmatch.data import get_dataset
from flowmatch.io import atomic_write_text
from flowmatch.metrics.distances import w2

VARIANTS = {"target": (1.0, 0.0), "modes 5.6% wider": (1.056, 0.0), "modes 10% wider": (1.1, 0.0),
            "2% on bridges": (1.0, 0.02), "4% on bridges": (1.0, 0.04)}


def perturbed(ds, mode: torch.Tensor, noise: torch.Tensor, r: torch.Tensor, side: torch.Tensor, along: torch.Tensor,
              widen: float, bridges: float) -> torch.Tensor:
    """The draw of modes ``mode`` ``[n]`` with noise ``noise`` ``[n, 2]``, its noise scaled by ``widen`` and the
    points with ``r < bridges`` moved onto a bridge (towards the neighbour ``side`` = +-1, ``along`` in [0, 1/2))."""
    x = ds.centers(dtype=noise.dtype)[mode] + widen * ds.std * noise
    angle = (mode.to(noise.dtype) + side * along) * (math.pi / 4)
    bridge = ds.radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) + 0.3 * noise
    return torch.where((r < bridges)[:, None], bridge, x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--seed", type=int, default=120_000)
    p.add_argument("--quasi", action="store_true", help="quasi-random draws and reference (exact shares)")
    p.add_argument("--out", help="a JSON file to write")
    args = p.parse_args()
    if args.draws < 2:
        p.error(f"--draws {args.draws}: give at least 2 (the spread between draws needs two)")
    ds = get_dataset("8gaussians")
    scores: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for i in range(args.draws):
        g = torch.Generator().manual_seed(args.seed + i)
        if args.quasi:  # row i of a quasi draw in mode i mod 8
            y = ds.quasi(args.n, seed=args.seed + 2 * i + 1)
            mode = torch.arange(args.n) % 8
            noise = (ds.quasi(args.n, seed=args.seed + 2 * i) - ds.centers()[mode]) / ds.std
        else:
            y = ds.reference(args.n, generator=g)
            mode = (torch.rand(args.n, generator=g, dtype=torch.float64) * 8).floor().long()
            noise = torch.randn(args.n, 2, generator=g)
        r, along = torch.rand(args.n, generator=g), 0.5 * torch.rand(args.n, generator=g)
        side = torch.where(torch.rand(args.n, generator=g) < 0.5, 1.0, -1.0)
        for key, (widen, bridges) in VARIANTS.items():
            scores[key].append(w2(perturbed(ds, mode, noise, r, side, along, widen, bridges), y))
        print(f"draw {i}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in scores.items()), flush=True)
    summary = {}
    for key, v in scores.items():
        diff = [a - b for a, b in zip(v, scores["target"])]
        summary[key] = {"mean": statistics.mean(v), "minus_target": statistics.mean(diff),
                        "se": statistics.stdev(diff) / math.sqrt(len(diff))}
        print(f"{key}: W2 {summary[key]['mean']:.4f}, minus the target's {summary[key]['minus_target']:+.4f} "
              f"± {summary[key]['se']:.4f}")
    if args.out:
        atomic_write_text(args.out, json.dumps({"n": args.n, "draws": args.draws, "seed": args.seed, "quasi": args.quasi,
                                                "scores": scores, "summary": summary}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
