"""Several training seeds of one setting against the teacher (or another entry), from one ``paired_fd.py`` JSON.

``paired_fd.py`` gives each entry's difference from the teacher with the standard error over its evaluation
draws. That error is the evaluation's alone: two training runs of one setting that differ only in
``train.seed`` select different checkpoints, and on the digits their ``fd_test`` differed by 0.1 to 0.4
(README), several times the evaluation's error. A claim about a setting needs its seeds side by side. This
script takes a ``paired_fd.py`` JSON whose entries include several seeds of a setting (``--group
NAME=ENTRY,ENTRY,...``; an entry as ``paired_fd.py`` names it, ``PATH euler 1``, or as its ``--also`` takes it,
``PATH:euler:1``) and gives, per group and score, each seed's paired difference from the teacher (the mean over
the draws) and the mean of those differences over the seeds with its standard error over the seeds (``sd /
sqrt(k)``; every seed is scored on the same draws, so this error holds the evaluation's noise and the seeds'),
and how many seeds lie below the teacher::

    python experiments/images/seed_spread.py runs/paired/digits_fit_seeds.json \\
        --group "APT=runs/a/checkpoints/best.pt:euler:1,runs/b/checkpoints/best.pt:euler:1"

``--against ENTRY`` takes the differences from another entry of the JSON instead of the teacher (e.g.
``--against "student euler 1"``: each seed against the start it was trained from).

Prints a table and writes the JSON (``--out``, atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

from flowmatch.io import atomic_write_text

TEACHER = "teacher dopri5"


def entry_key(name: str, scores: dict) -> str:
    """``name``'s key in ``scores``: itself, or its ``--also`` spelling ``PATH:SOLVER:NFE`` as ``PATH SOLVER NFE``."""
    if name in scores:
        return name
    parts = name.rsplit(":", 2)
    key = " ".join(parts) if len(parts) == 3 else name
    if key not in scores:
        raise SystemExit(f"seed_spread: entry {name!r} is not among the JSON's entries: {', '.join(sorted(scores))}")
    return key


def spread(scores: dict, entries: list[str], metrics: list[str], against: str = TEACHER) -> dict:
    """Per metric: each entry's mean paired difference from the entry ``against`` (the teacher unless told;
    ``per_seed``), their mean (``diff``), its standard error over the entries (``diff_se``; ``None`` for one
    entry) and the entries below ``against`` (``below``). ``entries`` and ``against`` are keys of ``scores``
    (:func:`entry_key`)."""
    out = {}
    for m in metrics:
        base = scores[against][m]
        per = [statistics.mean(v - b for v, b in zip(scores[e][m], base)) for e in entries]
        se = statistics.stdev(per) / math.sqrt(len(per)) if len(per) > 1 else None
        out[m] = {"per_seed": per, "diff": statistics.mean(per), "diff_se": se, "below": sum(d < 0 for d in per),
                  "seeds": len(per)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="a paired_fd.py output")
    p.add_argument("--group", action="append", required=True, metavar="NAME=ENTRY,ENTRY,...",
                   help="a setting's seeds (repeatable)")
    p.add_argument("--against", default=TEACHER, metavar="ENTRY",
                   help=f"the entry the seeds are compared with (default: {TEACHER!r})")
    p.add_argument("--out", default=None, help="the JSON written (default: none)")
    args = p.parse_args(argv)
    try:
        with open(args.json) as f:
            scores = json.load(f)["scores"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"seed_spread: {args.json} is not a paired_fd.py output: {e}") from None
    if args.against == TEACHER and TEACHER not in scores:
        raise SystemExit("seed_spread: the JSON has no teacher entry (paired_fd.py without --teacher none)")
    against = entry_key(args.against, scores)
    metrics = list(scores[against])
    result = {}
    for g in args.group:
        name, sep, rest = g.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"seed_spread: --group {g!r}: expected NAME=ENTRY,ENTRY,...")
        entries = [entry_key(e.strip(), scores) for e in rest.split(",") if e.strip()]
        result[name] = {"entries": entries, "scores": spread(scores, entries, metrics, against)}
    label = "the teacher" if against == TEACHER else against
    print(f"| setting | score | seeds | mean − {label} | SE over seeds | seeds below {label} | per seed |")
    print("|---|---|---|---|---|---|---|")
    for name, r in result.items():
        for m, s in r["scores"].items():
            se = "-" if s["diff_se"] is None else f"{s['diff_se']:.3f}"
            per = ", ".join(f"{d:+.3f}" for d in s["per_seed"])
            print(f"| {name} | {m} | {s['seeds']} | {s['diff']:+.3f} | {se} | {s['below']} | {per} |")
    if args.out:
        atomic_write_text(args.out, json.dumps({"json": args.json, "against": against, "groups": result}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
