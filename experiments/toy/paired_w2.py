"""Is a one-step student really worse than its teacher's adaptive solve, or is that sampling noise?

Scores a reflow chain's distilled one-step model (Euler, NFE 1) and its 1-RF teacher (dopri5) on the
same source draws against the same fresh target draws, over several independent draws of n points,
and prints each score, the spread between draws and the paired difference (each entry - teacher)::

    python experiments/toy/paired_w2.py runs/reflow/noise_to_moons --draws 10 --n 5000
    python experiments/toy/paired_w2.py runs/reflow/noise_to_moons --also 2-RF:dopri5 --also 3-RF:euler:1

The stage table scores one draw; between draws W2 moves by far more than the paired difference.
Every entry is scored against an evaluation reference (``target.reference``: a mixture's components
in exact shares, so the reference's own binomial split adds no scatter). The noise floor (i.i.d.
target draws, as a perfect model's samples are, against the reference) is scored alongside:
"floor - teacher" is how far the teacher is from the best a model can score. ``--also`` adds other
stages (or checkpoint files), each with its solver: an adaptive one at atol = rtol = 1e-5
(``2-RF:dopri5``) or a fixed-step solver and its NFE (``2-RF:euler:4``; an any-step model's jumps:
``Shortcut:anystep:1``).
On targets with layout positions (8gaussians, moons) each entry also gets a noise floor coupled to
it (``flowmatch.metrics.floor.CoupledFloor``: i.i.d. target draws through the entry's own split,
learnt on ``--fit-n`` samples from a source draw of seed ``--fit-seed``, none of the scored ones; its
noise from seeds 1,000,000 + the draw's), and
the summary gives each entry's W2 over its coupled floor with a standard error: the i.i.d. floor
scatters so much between draws (8gaussians: 17% of it a draw) that its ratio to a model over 10
draws is uncertain by 6-8%; against the coupled floor, by 1-2%. ``--fit-n 0`` leaves it out.
Writes ``paired_w2.json`` next to the chain's stages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from flowmatch.data.task import build_task
from flowmatch.io import atomic_write_text
from flowmatch.metrics.distances import w2
from flowmatch.metrics.floor import CoupledFloor, paired_ratio
from flowmatch.solvers import FIXED_SOLVERS, STEP_SOLVERS, get_solver, is_adaptive, solve
from flowmatch.training.checkpoint import load_model


def _entry(spec: str) -> tuple[str, str, int | None]:
    """``STAGE:ADAPTIVE`` (e.g. ``2-RF:dopri5``) or ``STAGE:SOLVER:NFE`` (``2-RF:euler:4``) -> (stage, solver, nfe)."""
    parts = spec.split(":")
    if len(parts) >= 2 and is_adaptive(parts[-1]):
        stage, solver, nfe = ":".join(parts[:-1]), parts[-1], None
    elif len(parts) >= 3 and (parts[-2] in FIXED_SOLVERS or parts[-2] in STEP_SOLVERS) and parts[-1].isdigit() \
            and int(parts[-1]) > 0:
        stage, solver, nfe = ":".join(parts[:-2]), parts[-2], int(parts[-1])
    else:
        raise SystemExit(f"--also {spec!r}: give STAGE:ADAPTIVE or STAGE:SOLVER:NFE, e.g. 2-RF:dopri5 or "
                         f"2-RF:euler:4 (fixed-step solvers: {', '.join([*FIXED_SOLVERS, *STEP_SOLVERS])})")
    return stage, solver, nfe


def also_entries(also: list[str]) -> list[tuple[str, str, str, int | None]]:
    """``--also`` specs as ``(key, stage, solver, nfe)``, the key naming the entry in the scores (e.g.
    ``2-RF euler 4``); a repeated spec is scored once."""
    return [(f"{stage} {solver}" + (f" {nfe}" if nfe else ""), stage, solver, nfe)
            for stage, solver, nfe in map(_entry, dict.fromkeys(also))]


def paired_arguments(p: argparse.ArgumentParser, *, student: str, n: int, out: str,
                     teacher_help: str = "the teacher's stage or a checkpoint file") -> argparse.Namespace:
    """The options of a paired script (this one and ``experiments/images/paired_fd.py``), parsed:
    ``--student``, ``--teacher``, ``--also``, ``--out``, ``--draws`` (at least 2), ``--n``, ``--seed``."""
    p.add_argument("--student", default=student, help=f"the one-step stage (default {student}) or a checkpoint file")
    p.add_argument("--teacher", default="1-RF", help=teacher_help)
    p.add_argument("--also", action="append", default=[], metavar="STAGE:SOLVER[:NFE]",
                   help="another stage or checkpoint to score on the same draws (repeatable)")
    p.add_argument("--out", help=f"the JSON to write (default RUN/{out})")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--n", type=int, default=n)
    p.add_argument("--seed", type=int, default=10_000)
    args = p.parse_args()
    if args.draws < 2:
        p.error(f"--draws {args.draws}: give at least 2 (the spread between draws needs two)")
    return args


def write_paired(args: argparse.Namespace, name: str, scores: dict, summary: dict,
                 extra: Optional[dict] = None) -> None:
    """Writes a paired script's scores and summary, with its options (and ``extra``'s entries), to ``--out``
    (default ``RUN/name``)."""
    out = args.out or os.path.join(args.run, name)
    atomic_write_text(out, json.dumps({"run": args.run, "student": args.student, "teacher": args.teacher,
                                       "also": args.also, "n": args.n, "draws": args.draws, "seed": args.seed,
                                       "scores": scores, "summary": summary, **(extra or {})}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a reflow chain's output directory (holds 1-RF/ and the distilled stage)")
    p.add_argument("--fit-n", type=int, default=500_000,
                   help="source points each entry's coupled noise floor is learnt on (0: no coupled floor)")
    p.add_argument("--fit-seed", type=int, default=100_000, help="the seed of that source draw")
    args = paired_arguments(p, student="3-RF+distill", n=5000, out="paired_w2.json")

    def ckpt(stage: str) -> str:  # a stage of the chain, or a checkpoint file
        return stage if os.path.isfile(stage) else os.path.join(args.run, stage, "checkpoints", "last.pt")

    entries = [("teacher dopri5", args.teacher, "dopri5", None), ("student euler 1", args.student, "euler", 1),
               *also_entries(args.also)]
    models = {key: load_model(ckpt(stage)) for key, stage, _, _ in entries}
    task = build_task(models["teacher dopri5"].config.data)
    source, target = task.source, task.target

    def run(key: str, solver: str, nfe: int | None, x0: torch.Tensor) -> torch.Tensor:
        # consistency sampling re-noises with draws of the source
        s = get_solver(solver, atol=1e-5, rtol=1e-5).for_source(source)
        return solve(models[key].model.eval(), x0, s, **({} if nfe is None else {"nfe": nfe})).x1

    coupled = args.fit_n > 0 and getattr(target, "has_positions", False)
    floors = {}
    if coupled:
        with torch.no_grad():
            fit = source.sample(args.fit_n, generator=torch.Generator().manual_seed(args.fit_seed))
            fitted = {}  # one floor a model and sampler: an entry named twice (a file and its stage) shares it
            for key, stage, solver, nfe in entries:
                same = (os.path.realpath(ckpt(stage)), solver, nfe)
                if same not in fitted:
                    samples = torch.cat([run(key, solver, nfe, c) for c in fit.split(50_000)])
                    fitted[same] = CoupledFloor(target, samples)
                floors[key] = fitted[same]
    scores: dict[str, list[float]] = {key: [] for key, *_ in entries}
    scores["floor"] = []
    scores.update({f"floor coupled to {key}": [] for key in floors})
    # the draws are solved here, one after the other, and scored in threads (POT's exact W2 releases the GIL)
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool, torch.no_grad():
        pending = []
        for i in range(args.draws):
            g = torch.Generator().manual_seed(args.seed + i)
            x0 = source.sample(args.n, generator=g)
            y, y2 = target.reference(args.n, generator=g), target.sample(args.n, generator=g)
            outs = [run(key, solver, nfe, x0) for key, _, solver, nfe in entries]
            # every entry's coupled floor draws its noise from one stream of its own (seed 1,000,000 + the draw's)
            coupled_draws = [floors[key].draw(out, generator=torch.Generator().manual_seed(1_000_000 + args.seed + i))
                             for (key, *_), out in zip(entries, outs) if key in floors]
            pending.append([pool.submit(w2, a, y) for a in (*outs, y2, *coupled_draws)])
        for i, draw in enumerate(pending):
            for key, score in zip(scores, draw):
                scores[key].append(score.result())
            print(f"draw {i}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in scores.items()), flush=True)
    summary = {k: {"mean": statistics.mean(v), "sd": statistics.stdev(v)} for k, v in scores.items()}
    teacher = scores["teacher dopri5"]
    for key in [*(key for key, *_ in entries), "floor"]:
        v = scores[key]
        if key != "teacher dopri5":
            name = "student - teacher (paired)" if key == "student euler 1" else f"{key} - teacher (paired)"
            diff = [s - t for s, t in zip(v, teacher)]
            summary[name] = {"mean": statistics.mean(diff), "sd": statistics.stdev(diff)}
        if key in floors:
            r, se = paired_ratio(v, scores[f"floor coupled to {key}"])
            summary[f"{key} / its coupled floor"] = {"ratio": r, "se": se}
    for k, v in summary.items():
        print(f"{k}: ratio {v['ratio']:.4f} ± {v['se']:.4f}" if "ratio" in v
              else f"{k}: mean {v['mean']:+.5f}, sd {v['sd']:.5f}")
    write_paired(args, "paired_w2.json", scores, summary)


if __name__ == "__main__":
    main()
