"""Is a one-step student really worse than its teacher's adaptive solve, or is that sampling noise?

Scores a reflow chain's distilled one-step model (Euler, NFE 1) and its 1-RF teacher (dopri5) on the
same source draws against the same fresh target draws, over several independent draws of n points,
and prints each score, the spread between draws and the paired difference (student - teacher)::

    python experiments/toy/paired_w2.py runs/reflow/noise_to_moons --draws 10 --n 5000

The stage table scores one draw; between draws W2 moves by far more than the paired difference.
Writes ``paired_w2.json`` next to the chain's stages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor

import torch

from flowmatch.data.task import build_task
from flowmatch.metrics.distances import w2
from flowmatch.solvers import solve
from flowmatch.training.checkpoint import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a reflow chain's output directory (holds 1-RF/ and the distilled stage)")
    p.add_argument("--student", default="3-RF+distill",
                   help="the one-step stage (default 3-RF+distill) or a checkpoint file")
    p.add_argument("--teacher", default="1-RF", help="the teacher's stage or a checkpoint file")
    p.add_argument("--out", help="the JSON to write (default RUN/paired_w2.json)")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--seed", type=int, default=10_000)
    args = p.parse_args()

    def ckpt(stage: str) -> str:  # a stage of the chain, or a checkpoint file
        return stage if os.path.isfile(stage) else os.path.join(args.run, stage, "checkpoints", "last.pt")

    teacher, student = load_model(ckpt(args.teacher)), load_model(ckpt(args.student))
    cfg = teacher.config
    task = build_task(cfg.data)
    source, target = task.source, task.target
    scores: dict[str, list[float]] = {"teacher dopri5": [], "student euler 1": [], "floor": []}
    # the draws are solved here, one after the other, and scored in threads (POT's exact W2 releases the GIL)
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool, torch.no_grad():
        pending = []
        for i in range(args.draws):
            g = torch.Generator().manual_seed(args.seed + i)
            x0 = source.sample(args.n, generator=g)
            y, y2 = target.sample(args.n, generator=g), target.sample(args.n, generator=g)
            teacher_x1 = solve(teacher.model.eval(), x0, "dopri5", atol=1e-5, rtol=1e-5).x1
            student_x1 = solve(student.model.eval(), x0, "euler", nfe=1).x1
            pending.append([pool.submit(w2, a, y) for a in (teacher_x1, student_x1, y2)])
        for i, draw in enumerate(pending):
            for key, score in zip(scores, draw):
                scores[key].append(score.result())
            print(f"draw {i}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in scores.items()), flush=True)
    diff = [s - t for s, t in zip(scores["student euler 1"], scores["teacher dopri5"])]
    summary = {k: {"mean": statistics.mean(v), "sd": statistics.stdev(v)} for k, v in scores.items()}
    summary["student - teacher (paired)"] = {"mean": statistics.mean(diff), "sd": statistics.stdev(diff)}
    for k, v in summary.items():
        print(f"{k}: mean {v['mean']:.4f}, sd {v['sd']:.4f}")
    out = args.out or os.path.join(args.run, "paired_w2.json")
    with open(out, "w") as f:
        json.dump({"run": args.run, "student": args.student, "teacher": args.teacher, "n": args.n,
                   "draws": args.draws, "seed": args.seed, "scores": scores, "summary": summary}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
