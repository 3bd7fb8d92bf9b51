"""Reports: the tables and markdown the pipelines write, built from bench rows.

- :func:`demo_report`: the demo's ``report.md`` (its headline table from :func:`headline_table`).
- :func:`stage_columns`: the columns of a reflow chain's stage table (``stages.md``, ``stages.csv``).
- :func:`reflow_targets` and :func:`write_reflow_summary`: the numbers reflow is judged by
  (``targets.md``) beside every chain's stage rows.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from flowmatch.bench import rows_to_markdown, write_bench
from flowmatch.io import atomic_write_text
from flowmatch.training import load_checkpoint

__all__ = ["STAGE_COLUMNS", "IMAGE_STAGE_COLUMNS", "stage_columns", "headline_table", "demo_report",
           "reflow_targets", "write_reflow_summary"]

STAGE_COLUMNS = ("task", "stage", "solver", "num_steps", "nfe", "w2", "w2_floor", "mmd", "straightness",
                 "straightness_rel", "seconds", "n")
IMAGE_STAGE_COLUMNS = ("task", "stage", "solver", "num_steps", "nfe", "fd", "fd_floor", "kid", "fd_test",
                       "straightness", "straightness_rel", "seconds", "n")


def stage_columns(rows: Sequence[dict]) -> tuple:
    """The stage table's columns: W2 (toy), FD (images), or both when one table holds both kinds."""
    kinds = {"fd" in r for r in rows}
    if kinds == {True}:
        return IMAGE_STAGE_COLUMNS
    if kinds == {True, False}:
        return STAGE_COLUMNS[:8] + ("fd", "fd_floor", "kid", "fd_test") + STAGE_COLUMNS[8:]
    return STAGE_COLUMNS


def headline_table(rows: list[dict], summaries: Mapping, nfes: Sequence[int]) -> str:
    """Per experiment (``summaries``: name -> :class:`~flowmatch.pipelines.TrainSummary`): W2 at Euler
    NFE ``nfes`` and dopri5, the W2 floor, straightness and train steps/s, as a markdown table."""
    header = ["experiment", "task", "coupling"] + [f"Euler {k}" for k in nfes] + [
        "dopri5 (NFE)", "W2 floor", "straightness S", "S / E|Z1-Z0|^2", "train steps/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, s in summaries.items():
        rs = [r for r in rows if r["model"] == name]
        if not rs:
            continue
        eul = {r["nfe"]: r["w2"] for r in rs if r["solver"] == "euler"}
        dop = [r for r in rs if r["solver"] == "dopri5"]
        cfgc = load_checkpoint(s.checkpoint)["config"]
        cells = [name, rs[0]["task"], cfgc["coupling"]["name"]] + [f"{eul[k]:.3f}" if k in eul else "-" for k in nfes]
        cells += [f"{dop[0]['w2']:.3f} ({dop[0]['nfe']})" if dop else "-", f"{rs[0]['w2_floor']:.3f}",
                  f"{rs[0]['straightness']:.3f}", f"{rs[0]['straightness_rel']:.4f}", f"{s.steps_per_sec:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def demo_report(out: str, rows: list[dict], summaries: Mapping, plots: Sequence[str], *, n: int,
                nfes: Sequence[int], elapsed: float) -> str:
    """The demo's ``report.md`` for the runs ``summaries`` benchmarked into ``rows``: how it was made,
    :func:`headline_table`, every solver's row, the W2-vs-NFE ``plots`` and each run's samples and
    trajectories (image links relative to ``out``)."""
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    md = ["# flowmatch demo report", "",
          "Made by `make demo` (`flowmatch demo --out " + out + "`): each config under `experiments/toy/` is trained "
          "on the CPU, then its EMA model is sampled from the same source draws with every solver at NFE "
          f"{', '.join(map(str, nfes))} and with dopri5 (atol = rtol = 1e-5). W2 is exact on n = {n} samples "
          f"against an evaluation reference of n target points (a mixture's components in exact shares, "
          f"`target.reference`); the W2 floor is the W2 of n = {n} i.i.d. target draws against that reference, "
          "what a perfect model scores on average (one draw can fall below it). W2 on 2,000 points is noisy: across source and reference seeds the same "
          "model's W2 moves by about +-0.05 here, so smaller differences are not significant. Straightness S = int_0^1 E|(Z1 - Z0) - v(Z_t, t)|^2 dt, summed "
          "over dimensions, along RK4 trajectories with 64 steps from 1,000 source draws. Heun and midpoint cost "
          "2 NFE per step, RK4 4 (Heun's last step is a full Heun step).", "",
          f"Total time of this invocation: {elapsed:.0f} s (finished runs are reused).", "",
          "## Headline: W2 against NFE (Euler) and dopri5", "", headline_table(rows, summaries, nfes), "",
          "## All solvers", "", rows_to_markdown(rows, ("model", "solver", "num_steps", "nfe", "w2", "w2_floor", "mmd",
                                                         "seconds")), ""]
    md += ["## W2 against NFE", ""] + [f"![{rel(p)}]({rel(p)})" for p in plots] + [""]
    md += ["## Samples and trajectories", ""]
    for name, s in summaries.items():
        pd = os.path.join(s.run_dir, "plots")
        md += [f"### {name}", "", f"![samples]({rel(os.path.join(pd, 'samples.png'))}) "
               f"![trajectories]({rel(os.path.join(pd, 'trajectories.png'))})", ""]
    return "\n".join(md)


def reflow_targets(rows: list[dict]) -> list[dict]:
    """Per task, the numbers reflow is judged by: straightness of 2-RF over 1-RF, one-step W2 of
    2-RF and of the distilled stage against the noise floor and against 1-RF's dopri5 W2, and
    2-RF's dopri5 W2 against 1-RF's (reflow should keep the marginals)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        get = lambda stage, solver, nfe=None: next((r for r in rs if r["stage"] == stage and r["solver"] == solver  # noqa: E731
                                                    and (nfe is None or r["nfe"] == nfe)), None)
        one, two = get("1-RF", "euler", 1), get("2-RF", "euler", 1)
        ada1, ada2 = get("1-RF", "dopri5"), get("2-RF", "dopri5")
        dist = next((r for r in rs if r["stage"].endswith("+distill") and r["solver"] == "euler" and r["nfe"] == 1), None)
        if one is None:
            continue
        m = "fd" if "fd" in one else "w2"
        M = m.upper()
        floor = one[f"{m}_floor"]
        row = {"task": task, f"{m}_floor": floor, "S(1-RF)": one["straightness"],
               "S(2-RF)": two["straightness"] if two else None,
               "S ratio 2-RF/1-RF": two["straightness"] / one["straightness"] if two else None,
               f"1-RF dopri5 {M}": ada1[m] if ada1 else None, f"2-RF dopri5 {M}": ada2[m] if ada2 else None,
               f"1-RF Euler-1 {M}": one[m], f"2-RF Euler-1 {M}": two[m] if two else None,
               "distilled stage": dist["stage"] if dist else None, f"distilled Euler-1 {M}": dist[m] if dist else None}
        best = min(w for w in (row[f"2-RF Euler-1 {M}"], row[f"distilled Euler-1 {M}"]) if w is not None) if (two or dist) else None
        row[f"best one-step {M} / floor"] = best / floor if best is not None and floor else None
        if m == "fd":  # the image target: one-step distilled FD against 1-RF's adaptive FD
            row["distilled Euler-1 FD / 1-RF dopri5 FD"] = (dist[m] / ada1[m]) if dist and ada1 else None
        out.append(row)
    return out


def write_reflow_summary(rows: list[dict], out: str) -> str:
    """Write every chain's stage rows to ``OUT/stages.json``/``.csv``/``.md`` and the target table to
    ``OUT/targets.json``/``.md``; returns the target table as markdown."""
    write_bench(rows, out, plot=False, name="stages", columns=stage_columns(rows))
    targets = reflow_targets(rows)
    md = rows_to_markdown(targets)
    atomic_write_text(os.path.join(out, "targets.json"), json.dumps(targets, indent=1))
    atomic_write_text(os.path.join(out, "targets.md"), md)
    return md
