"""The front between validation FD and validation copies that APT runs on images trace.

An APT run on ``data.split=fit`` logs, at each validation, its EMA generator's mean FD against the
``val`` split (``apt/val_fd``) and its ``copies`` (``apt/val_copies``: the fraction of samples nearer a
fit image than 95% of the val images are; new images score 0.05). Along a run both move: the FD falls
while the samples sharpen towards the training images. A setting is better than another only if it
moves the whole front, a lower FD at the same copies. This reads the runs' ``metrics.jsonl`` and prints
and writes, per run and over all of them, the lowest FD at copies at most each ``--ceilings`` value (the
teacher's own copies among them when ``--teacher`` is given), and the FD-best checkpoint whatever its
copies, e.g. the digits runs of the README's table (the config's stage and probes run from it)::

    python experiments/images/apt_front.py runs/images/digits/2-RF+distill+APT runs/apt_probe/digits_rt75_e25 \
        runs/apt_probe/digits_rt25 ... --teacher runs/images/digits/1-RF/checkpoints/last.pt \
        --out runs/apt_front/digits.json --plot runs/apt_front/digits.png

``--teacher`` scores that checkpoint's samples (dopri5 at the config's ``eval.atol`` / ``eval.rtol``, as
``paired_fd.py`` solves it) on the validation draws of the first run's config, the very draws and scorer
its APT objective selects with (``apt.eval_draws`` draws of ``apt.eval_n`` source points, seeds
``VALIDATION_SEED + 1000 i``); ``--teacher-score FD,COPIES`` gives that point instead. A run directory
without logged copies is refused, naming it. This scores only what the runs logged: nothing here is held
out, and a front on the validation draws is not a result on held-out ones (``paired_fd.py`` scores chosen
checkpoints there).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import torch

FD, COPIES = "apt/val_fd", "apt/val_copies"


def read_trajectory(run: str) -> list[dict]:
    """``[{"step", "fd", "copies"}]`` of ``run``'s validations after the start (step 0, the start itself,
    is left out), in logged order; a run without ``metrics.jsonl`` or without logged copies is refused
    with a ValueError naming it."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run}: no metrics.jsonl (give an APT run directory)")
    rows = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if FD in r and COPIES in r and r["step"] > 0:
                rows.append({"step": int(r["step"]), "fd": float(r[FD]), "copies": float(r[COPIES])})
    if not rows:
        raise ValueError(f"{run}: no validation with {FD} and {COPIES} after step 0 (an APT run on an image "
                         f"task with data.split=fit logs both)")
    return rows


def best_under(rows: Sequence[dict], ceiling: Optional[float]) -> Optional[dict]:
    """The row of lowest FD among those with copies at most ``ceiling`` (None: every row); the earliest of
    equal FDs; None when no row is under the ceiling."""
    ok = [r for r in rows if ceiling is None or r["copies"] <= ceiling]
    return min(ok, key=lambda r: (r["fd"], r["step"])) if ok else None


def front(runs: dict[str, list[dict]], ceilings: Sequence[float]) -> dict:
    """Per run and over all runs: the best row under each ceiling and the FD-best row. Keys of each
    ceiling: its value as a string (``"0.05"``); ``"any"``: no ceiling."""
    per_run = {name: {**{str(c): best_under(rows, c) for c in ceilings}, "any": best_under(rows, None)}
               for name, rows in runs.items()}
    overall = {}
    for key in [*map(str, ceilings), "any"]:
        cands = [{"run": name, **best[key]} for name, best in per_run.items() if best[key] is not None]
        overall[key] = min(cands, key=lambda r: (r["fd"], r["step"], r["run"])) if cands else None
    return {"runs": per_run, "overall": overall}


@torch.no_grad()
def teacher_point(teacher: str, cfg, *, atol: float, rtol: float) -> dict:
    """``{"fd", "copies"}`` of ``teacher``'s dopri5 samples on the validation draws of ``cfg`` (an APT
    run's config): each draw's scores as its APT objective computes them, averaged over the draws."""
    from flowmatch.training.checkpoint import load_model

    return validation_point(load_model(teacher).model.eval(), cfg, solver="dopri5", atol=atol, rtol=rtol)


@torch.no_grad()
def validation_point(model, cfg, *, solver: str = "dopri5", atol: float = 1e-4, rtol: float = 1e-4) -> dict:
    """``{"fd", "copies"}``: the mean over ``cfg``'s APT validation draws
    (:func:`flowmatch.distill.adversarial.validation_draws`, the objective's own) of the validation scorer's
    FD and copies of ``model``'s samples (``solver``, adaptive) from each draw's source points."""
    import flowmatch.evaluation  # noqa: F401 - registers the validation scorer
    from flowmatch.data.task import build_source
    from flowmatch.distill.adversarial import validation_draws
    from flowmatch.solvers import solve

    per_draw = [scorer(solve(model, x0, solver, atol=atol, rtol=rtol).x1)
                for x0, scorer in validation_draws(cfg, build_source(cfg.data))]
    return {k: sum(float(d[k]) for d in per_draw) / len(per_draw) for k in ("fd", "copies")}


def table(result: dict, ceilings: Sequence[float], teacher: Optional[dict]) -> str:
    """The markdown table of :func:`front`'s result: a row a run, then the best over all runs."""
    def cell(r: Optional[dict]) -> str:
        return "-" if r is None else f"{r['fd']:.3f} / {r['copies']:.3f} ({r['step']})"

    head = [f"best with copies <= {c}" for c in ceilings] + ["FD-best"]
    lines = ["| run | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    keys = [*map(str, ceilings), "any"]
    for name, best in result["runs"].items():
        lines.append(f"| {name} | " + " | ".join(cell(best[k]) for k in keys) + " |")
    lines.append("| **all runs** | " + " | ".join(
        "-" if (r := result["overall"][k]) is None else f"{cell(r)} {r['run']}" for k in keys) + " |")
    if teacher is not None:
        lines.append(f"\nteacher: FD {teacher['fd']:.3f}, copies {teacher['copies']:.3f}")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], teacher: Optional[dict], ceilings: Sequence[float], path: str) -> None:
    """Each run's validations in the (copies, FD) plane, the teacher's point and the ceilings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, rows in runs.items():
        ax.plot([r["copies"] for r in rows], [r["fd"] for r in rows], marker=".", lw=0.8, label=name)
    if teacher is not None:
        ax.plot([teacher["copies"]], [teacher["fd"]], "k*", ms=12, label="teacher (dopri5)")
    for c in ceilings:
        ax.axvline(c, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("validation copies")
    ax.set_ylabel("validation FD")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from flowmatch.io import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="APT run directories (each with metrics.jsonl and config.yaml)")
    p.add_argument("--ceilings", default="0.045,0.05", help="copies ceilings, comma-separated")
    p.add_argument("--teacher", help="a teacher checkpoint to score on the first run's validation draws (dopri5)")
    p.add_argument("--teacher-score", metavar="FD,COPIES", help="the teacher's validation point, given")
    p.add_argument("--atol", type=float, help="the teacher's dopri5 tolerances (default: the run config's "
                   "eval.atol and eval.rtol, as paired_fd.py solves it)")
    p.add_argument("--rtol", type=float)
    p.add_argument("--out", help="a JSON file to write (atomically)")
    p.add_argument("--plot", help="a PNG of the runs' validations in the (copies, FD) plane")
    args = p.parse_args(argv)
    try:
        ceilings = sorted({float(c) for c in args.ceilings.split(",") if c.strip()})
    except ValueError:
        p.error(f"--ceilings {args.ceilings!r}: give fractions, comma-separated (e.g. 0.045,0.05)")
    if args.teacher and args.teacher_score:
        p.error("give --teacher or --teacher-score, not both")
    runs = {}
    for run in args.runs:
        try:
            runs[os.path.basename(os.path.normpath(run))] = read_trajectory(run)
        except ValueError as e:
            p.error(str(e))
    teacher = None
    if args.teacher_score:
        try:
            fd, copies = (float(v) for v in args.teacher_score.split(","))
        except ValueError:
            p.error(f"--teacher-score {args.teacher_score!r}: give FD,COPIES (e.g. 0.979,0.041)")
        teacher = {"fd": fd, "copies": copies}
    elif args.teacher:
        from flowmatch.config import load_config

        cfg = load_config(os.path.join(args.runs[0], "config.yaml"))
        teacher = teacher_point(args.teacher, cfg, atol=cfg.eval.atol if args.atol is None else args.atol,
                                rtol=cfg.eval.rtol if args.rtol is None else args.rtol)
    if teacher is not None:  # the teacher's own copies is a ceiling too: below its FD at no more copies?
        ceilings = sorted({*ceilings, round(teacher["copies"], 6)})
    result = front(runs, ceilings)
    print(table(result, ceilings, teacher), end="")
    if args.out:
        atomic_write_text(args.out, json.dumps({"runs_given": args.runs, "ceilings": ceilings, "teacher": teacher,
                                                **result}, indent=2))
    if args.plot:
        plot(runs, teacher, ceilings, args.plot)


if __name__ == "__main__":
    main()
