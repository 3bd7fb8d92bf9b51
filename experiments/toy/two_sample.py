"""Can a discriminator tell a model's samples from the data at all? A classifier two-sample test.

Adversarial post-training (APT) corrects a one-step generator only where its discriminator can tell the
generator's samples from real ones. This script asks that question of a chain's models directly, with
far more samples than an APT batch: per model, ``--n`` of its samples against ``--n`` fresh target draws,
a classifier (an MLP on random Fourier features of x, the kind APT's discriminator head uses) trained on
three quarters and tested on the rest. Test accuracy 0.5 (within its binomial standard error) means the
two sets are indistinguishable to it; the row ``data`` (fresh target draws against target draws) is the
control. Beside it, where the samples' mass lies: the fraction of a model's samples farther than each
``--radius`` from their nearest of ``--n`` other target draws, against the same fraction for target draws
(the excess W2 of a model that no classifier sees sits in such sparse far points: W2 weighs each by its
squared distance, a classifier by its share of the mass)::

    python experiments/toy/two_sample.py runs/reflow/noise_to_moons
    python experiments/toy/two_sample.py runs/reflow/noise_to_moons --model 2-RF+distill+APT:euler:1

Models are ``STAGE:SOLVER[:NFE]`` as in ``paired_w2.py`` (default: the teacher by dopri5 and the
distilled model by one Euler step). Seeds from ``--seed`` (40,000: none of the other scripts'). Writes
``--out`` (default ``RUN/two_sample.json``) atomically and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
from torch import nn
from scipy.spatial import cKDTree

from flowmatch.bench import rows_to_markdown
from flowmatch.data.task import build_task
from flowmatch.io import atomic_write_text
from flowmatch.solvers import get_solver, solve
from flowmatch.training.checkpoint import load_model
from paired_w2 import _entry

FOURIER, SCALE, HIDDEN = 128, 3.0, 256


def classifier_test(a: torch.Tensor, b: torch.Tensor, *, steps: int, seed: int) -> dict:
    """Train a classifier of ``a`` (label 1) against ``b`` (label 0) on the first three quarters of each,
    score it on the rest: accuracy, its binomial standard error at 0.5, log-loss minus ln 2."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(a.shape[1], FOURIER, generator=gen) * SCALE
    with torch.random.fork_rng(devices=[]):  # the classifier's initialisation: fixed by the seed
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(2 * FOURIER + a.shape[1], HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, HIDDEN),
                            nn.SiLU(), nn.Linear(HIDDEN, 1))

    def logits(x):
        return net(torch.cat([torch.sin(x @ w), torch.cos(x @ w), x], dim=1)).squeeze(1)

    n = a.shape[0]
    fit = 3 * n // 4
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    half = 512
    labels = torch.cat([torch.ones(half), torch.zeros(half)])
    for _ in range(steps):
        ia, ib = torch.randint(0, fit, (half,), generator=gen), torch.randint(0, fit, (half,), generator=gen)
        loss = nn.functional.binary_cross_entropy_with_logits(logits(torch.cat([a[ia], b[ib]])), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x, y = torch.cat([a[fit:], b[fit:]]), torch.cat([torch.ones(n - fit), torch.zeros(n - fit)])
        out = logits(x)
        acc = ((out > 0).float() == y).float().mean().item()
        ll = nn.functional.binary_cross_entropy_with_logits(out, y).item()
    return {"accuracy": acc, "accuracy_se": math.sqrt(0.25 / (2 * (n - fit))), "logloss_minus_ln2": ll - math.log(2)}


def far_fractions(x: torch.Tensor, tree: cKDTree, radii: list[float]) -> dict:
    """The fraction of the points ``x`` whose nearest point of ``tree`` is farther than each radius."""
    d, _ = tree.query(x.double().numpy(), k=1)
    return {f"far > {r}": float((d > r).mean()) for r in radii}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a reflow chain's output directory (holds 1-RF/ and its other stages)")
    p.add_argument("--model", action="append", default=[], metavar="STAGE:SOLVER[:NFE]",
                   help="a stage (or checkpoint) and its sampler (repeatable; default 1-RF:dopri5 and "
                        "2-RF+distill:euler:1)")
    p.add_argument("--n", type=int, default=40_000)
    p.add_argument("--steps", type=int, default=4000, help="the classifier's Adam steps (batches of 1,024)")
    p.add_argument("--radius", default="0.1,0.2,0.3")
    p.add_argument("--seed", type=int, default=40_000)
    p.add_argument("--out")
    args = p.parse_args()
    if args.n < 8:
        p.error(f"--n {args.n}: give at least 8")
    radii = [float(r) for r in args.radius.split(",")]
    specs = args.model or ["1-RF:dopri5", "2-RF+distill:euler:1"]

    def ckpt(stage: str) -> str:
        return stage if os.path.isfile(stage) else os.path.join(args.run, stage, "checkpoints", "last.pt")

    entries = [(spec, *_entry(spec)) for spec in dict.fromkeys(specs)]
    models = {spec: load_model(ckpt(stage)) for spec, stage, _, _ in entries}
    task = build_task(next(iter(models.values())).config.data)

    def draw(dist, k: int) -> torch.Tensor:
        return dist.sample(args.n, generator=torch.Generator().manual_seed(args.seed + k))

    real, tree = draw(task.target, 0), cKDTree(draw(task.target, 1).double().numpy())
    rows = []
    samples = {"data": draw(task.target, 2)}
    with torch.no_grad():
        for i, (spec, _, solver, nfe) in enumerate(entries):
            s = get_solver(solver, atol=1e-5, rtol=1e-5).for_source(task.source)
            x0 = draw(task.source, 10 + i)
            samples[spec] = solve(models[spec].model.eval(), x0, s, **({} if nfe is None else {"nfe": nfe})).x1
    for i, (name, x) in enumerate(samples.items()):
        row = {"model": name} | classifier_test(x, real, steps=args.steps, seed=args.seed + 100 + i)
        row |= far_fractions(x, tree, radii)
        rows.append(row)
        print({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    out = args.out or os.path.join(args.run, "two_sample.json")
    atomic_write_text(out, json.dumps({"run": args.run, "models": specs, "n": args.n, "steps": args.steps,
                                       "seed": args.seed, "rows": rows}, indent=1))
    shown = [{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    print(rows_to_markdown(shown, list(shown[0])), end="")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
