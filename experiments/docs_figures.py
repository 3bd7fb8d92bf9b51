"""The README's figures (``docs/*.png``) from the outputs of ``make demo`` and ``make reflow``::

    make figures                                   # = python experiments/docs_figures.py --runs runs --out docs
    python experiments/docs_figures.py --runs /elsewhere/runs --tasks noise_to_moons
    python experiments/docs_figures.py --smoke     # tiny sizes: checks the script end to end in seconds

What each figure shows: :mod:`flowmatch.viz.docs`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from flowmatch.errors import FlowmatchError
from flowmatch.viz.docs import FULL, SMOKE, docs_figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs", help="the folder holding demo/ and reflow/ (default runs)")
    p.add_argument("--out", default="docs", help="where the PNGs go (default docs)")
    p.add_argument("--tasks", default=None, help="comma-separated reflow tasks (default every chain found)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a check, not figures to keep)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        paths = docs_figures(args.runs, args.out, sizes=SMOKE if args.smoke else FULL, seed=args.seed,
                             tasks=args.tasks.split(",") if args.tasks else None)
    except FlowmatchError as e:
        print(f"docs_figures: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"{path}  ({os.path.getsize(path) // 1024} KB)")
    print(f"{len(paths)} figures in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
