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

Several JSONs scored on the same draws (the same ``--seed``, ``--n`` and ``--draws`` of ``paired_fd.py``) are read
as one: a setting's seeds scored later join those of a JSON made before, and an entry in more than one (the
teacher) must score the same in each, or the files are refused. ``--compare A,B`` sets two groups side by side:
per score the mean over A's seeds less the mean over B's, with the standard error of that difference over the
seeds of both (``sqrt(sd_A^2 / k_A + sd_B^2 / k_B)``: the two settings' training runs are independent), so that a
claim that one setting beats another rests on the seeds of both::

    python experiments/images/seed_spread.py runs/paired/old.json runs/paired/new.json \
        --group "old=..." --group "new=..." --compare new,old

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


def merged_scores(paths: list[str]) -> dict:
    """The ``scores`` of the ``paired_fd.py`` JSONs at ``paths`` as one dict (an entry in several files holds the
    scores of all of them); refused (``SystemExit``) unless every file was scored on the same draws (its ``seed``,
    ``n`` and ``draws``) and an entry in several files scores the same in each score they share."""
    scores, draws, first = {}, None, None
    for path in paths:
        try:
            with open(path) as f:
                got = json.load(f)
            these = got["scores"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"seed_spread: {path} is not a paired_fd.py output: {e}") from None
        how = {k: got.get(k) for k in ("seed", "n", "draws")}
        if draws is None:
            draws, first = how, path
        elif how != draws:
            raise SystemExit(f"seed_spread: {path} was scored on other draws than {first} ({how} against {draws}): "
                             f"score both with the same paired_fd.py --seed, --n and --draws")
        for key, sc in these.items():
            known = scores.setdefault(key, {})
            if any(known[m] != v for m, v in sc.items() if m in known):  # a score both files hold
                raise SystemExit(f"seed_spread: entry {key!r} scores differently in {path} than in an earlier file")
            known.update(sc)
    return scores


def compare(a: dict, b: dict) -> dict:
    """Per metric, group ``a``'s mean over its seeds less group ``b``'s (``diff``), from :func:`spread`'s results
    against one entry, with the standard error over both groups' seeds (``diff_se``: ``None`` where either group
    has one seed)."""
    out = {}
    for m in a:
        pa, pb = a[m]["per_seed"], b[m]["per_seed"]
        se = (math.sqrt(statistics.variance(pa) / len(pa) + statistics.variance(pb) / len(pb))
              if len(pa) > 1 and len(pb) > 1 else None)
        out[m] = {"diff": statistics.mean(pa) - statistics.mean(pb), "diff_se": se, "seeds": [len(pa), len(pb)]}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="paired_fd.py outputs, scored on the same draws")
    p.add_argument("--group", action="append", required=True, metavar="NAME=ENTRY,ENTRY,...",
                   help="a setting's seeds (repeatable)")
    p.add_argument("--against", default=TEACHER, metavar="ENTRY",
                   help=f"the entry the seeds are compared with (default: {TEACHER!r})")
    p.add_argument("--compare", action="append", default=[], metavar="A,B",
                   help="group A's mean over its seeds less group B's, with the error over both (repeatable)")
    p.add_argument("--out", default=None, help="the JSON written (default: none)")
    args = p.parse_args(argv)
    scores = merged_scores(args.json)
    if args.against == TEACHER and TEACHER not in scores:
        raise SystemExit("seed_spread: the JSON has no teacher entry (paired_fd.py without --teacher none)")
    against = entry_key(args.against, scores)
    groups = {}
    for g in args.group:
        name, sep, rest = g.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"seed_spread: --group {g!r}: expected NAME=ENTRY,ENTRY,...")
        groups[name] = [entry_key(e.strip(), scores) for e in rest.split(",") if e.strip()]
    # the scores every entry holds (files scored with other paired_fd.py flags hold different ones)
    metrics = [m for m in scores[against] if all(m in scores[e] for es in groups.values() for e in es)]
    result = {name: {"entries": entries, "scores": spread(scores, entries, metrics, against)}
              for name, entries in groups.items()}
    pairs = []
    for c in args.compare:
        names = [n.strip() for n in c.split(",")]
        if len(names) != 2 or any(n not in result for n in names):
            raise SystemExit(f"seed_spread: --compare {c!r}: expected A,B, two of the groups ({', '.join(result)})")
        pairs.append(names)
    label = "the teacher" if against == TEACHER else against
    print(f"| setting | score | seeds | mean − {label} | SE over seeds | seeds below {label} | per seed |")
    print("|---|---|---|---|---|---|---|")
    for name, r in result.items():
        for m, s in r["scores"].items():
            se = "-" if s["diff_se"] is None else f"{s['diff_se']:.3f}"
            per = ", ".join(f"{d:+.3f}" for d in s["per_seed"])
            print(f"| {name} | {m} | {s['seeds']} | {s['diff']:+.3f} | {se} | {s['below']} | {per} |")
    comparisons = {}
    if pairs:
        print()
        print("| comparison | score | seeds | difference of the means | SE over both groups' seeds |")
        print("|---|---|---|---|---|")
    for a, b in pairs:
        key = f"{a} - {b}"
        comparisons[key] = compare(result[a]["scores"], result[b]["scores"])
        for m, c in comparisons[key].items():
            se = "-" if c["diff_se"] is None else f"{c['diff_se']:.3f}"
            print(f"| {a} − {b} | {m} | {c['seeds'][0]} and {c['seeds'][1]} | {c['diff']:+.3f} | {se} |")
    if args.out:
        atomic_write_text(args.out, json.dumps({"json": args.json, "against": against, "groups": result,
                                                "comparisons": comparisons}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
