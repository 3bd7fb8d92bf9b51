"""``flowmatch train|sample|bench|speed|reflow|adapter|demo``: parse -> config -> pipelines -> exit code.

Every user error prints one line ``flowmatch: error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _csv_list(value: str, cast=str) -> list:
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from flowmatch.bench import BENCH_NFES, BENCH_SOLVERS

    p = argparse.ArgumentParser(prog="flowmatch", description="Rectified flow / conditional flow matching.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,sample,bench,speed,reflow,adapter,demo}")

    t = sub.add_parser("train", help="train a flow from a YAML config")
    t.add_argument("config", help="experiment YAML (see experiments/)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")
    t.add_argument("--out", help="run directory (default runs/<name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--dry-run", action="store_true", help="validate and print the resolved config; write nothing")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="sample from a checkpoint with an ODE solver")
    s.add_argument("checkpoint")
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--solver", default="euler")
    s.add_argument("--nfe", type=int, help="function evaluations (fixed-step solvers; a multiple of the stages)")
    s.add_argument("--atol", type=float, default=1e-5, help="adaptive solvers only")
    s.add_argument("--rtol", type=float, default=1e-5, help="adaptive solvers only")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int, default=10_000, help="points solved at once")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--out", required=True, help="output file (.pt, or .npz)")
    s.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="a LoRA adapter of this checkpoint composed with WEIGHT (default 1; repeatable)")

    b = sub.add_parser("bench", help="benchmark checkpoints of one task across solvers, time grids and NFE")
    b.add_argument("checkpoints", nargs="+")
    b.add_argument("--solvers", type=_csv_list, default=list(BENCH_SOLVERS))
    b.add_argument("--nfe", type=lambda v: _csv_list(v, int), default=list(BENCH_NFES))
    b.add_argument("--n", type=int, default=2000, help="samples per headline row (W2 is exact on n points)")
    b.add_argument("--grids", "--grid", dest="grids", type=_csv_list, default=["uniform"],
                   help="time grids, the first one headline: uniform, cosine, power, power:RHO")
    b.add_argument("--grid-n", type=int, default=None, help="samples per row on the non-headline grids (default --n)")
    b.add_argument("--likelihood-n", type=int, default=0,
                   help="held-out target draws for the log-likelihood per model (0: skip)")
    b.add_argument("--atol", type=float, default=1e-5)
    b.add_argument("--rtol", type=float, default=1e-5)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="auto")
    b.add_argument("--tracking", default="offline", choices=["offline", "online", "disabled"])
    b.add_argument("--out", default="runs/bench")
    b.add_argument("--no-progress", action="store_true")

    sp = sub.add_parser("speed", help="training / sampling / pair-generation speed against baselines (make gpu-bench)")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--size", default="auto", help="full (GPU), small (CPU) or auto (full on CUDA)")
    sp.add_argument("--sections", type=_csv_list, default=["train", "sample", "pairs"],
                    help="train, sample, pairs (default) and unet (image training throughput)")
    sp.add_argument("--compile", default=None, help="torch.compile mode of the fast training step (default: train.compile=auto)")
    sp.add_argument("--capture", default="auto", help="sampling capture mode: auto, cuda_graph, compile, eager")
    sp.add_argument("--out", default="runs/gpu_bench")

    r = sub.add_parser("reflow", help="reflow: generate teacher pairs, or run the k-rectified-flow chain")
    rsub = r.add_subparsers(dest="reflow_command", required=True, metavar="{generate,run,sweep}")
    g = rsub.add_parser("generate", help="integrate a teacher from source draws and store the pairs (resumable)")
    g.add_argument("--teacher", required=True, help="teacher checkpoint")
    g.add_argument("--n", "--num-pairs", dest="n", type=int, required=True,
                   help="number of pairs (under torchrun, put -- before the flowmatch arguments)")
    g.add_argument("--solver", default="dopri5")
    g.add_argument("--nfe", type=int, help="fixed-step solvers: evaluations per sample")
    g.add_argument("--atol", type=float, default=1e-5)
    g.add_argument("--rtol", type=float, default=1e-5)
    g.add_argument("--out", required=True, help="pair store directory")
    g.add_argument("--shard-size", type=int, default=10_000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale for a class-conditional teacher (1: conditional)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16 integrates under bf16 autocast (pairs stored in fp32)")
    g.add_argument("--no-progress", action="store_true")
    rr = rsub.add_parser("run", help="1-RF -> pairs -> 2-RF -> ... -> K-RF [-> distil], benchmarked per stage")
    rr.add_argument("configs", nargs="+", metavar="CONFIG",
                    help="experiment YAML(s) with a reflow: section (see experiments/toy/reflow_*.yaml)")
    rr.add_argument("--rounds", type=int, help="K (default reflow.rounds)")
    rr.add_argument("--distill", action="store_true", default=None, help="distil the last round to one step")
    rr.add_argument("--apt", action="store_true", default=None,
                    help="then post-train the distilled model adversarially (the apt section; needs --distill)")
    rr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rr.add_argument("--out", default=os.path.join("runs", "reflow"),
                    help="parent directory: each chain goes to OUT/<name>; the tables of all go to OUT/stages.*")
    rr.add_argument("--no-progress", action="store_true")

    sw = rsub.add_parser("sweep", help="one reflow round per value of a config key, from one shared teacher")
    sw.add_argument("config")
    sw.add_argument("--key", required=True, help="e.g. reflow.num_pairs, reflow.atol, reflow.mix")
    sw.add_argument("--values", required=True, type=_csv_list, help="comma-separated values")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sw.add_argument("--out", required=True)
    sw.add_argument("--no-progress", action="store_true")

    ds = sub.add_parser("distill", help="few-step methods from one teacher: the few-step table")
    dsub = ds.add_subparsers(dest="distill_command", required=True)
    dr = dsub.add_parser("run", help="teacher -> reflow, distill, cd, ct, shortcut, meanflow, ...; one table, "
                                      "quality beside cost")
    dr.add_argument("configs", nargs="+", metavar="CONFIG",
                    help="experiment YAML(s) with reflow:, consistency:, shortcut: and meanflow:")
    dr.add_argument("--methods", type=_csv_list, default=None,
                    help="comma-separated, of reflow, distill, apt, cd, ct, cd-lora, shortcut, meanflow, "
                         "ot-cfm (default: all)")
    dr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    dr.add_argument("--out", default=os.path.join("runs", "few_step"),
                    help="parent directory: each task goes to OUT/<name>; all summaries to OUT/few_step.md")
    dr.add_argument("--train-only", action="store_true",
                    help="train (or reuse) the methods' stages and write no table: a part of a table trained in "
                         "several processes, benched by a last run with every method")
    dr.add_argument("--no-progress", action="store_true")
    dc = dsub.add_parser("compose", help="a style LoRA + an acceleration LoRA composed, against a dedicated one")
    dc.add_argument("config", help="a toy experiment YAML (its 1-RF is the base)")
    dc.add_argument("--style-target", default="upper_moon", help="the style's target dataset (default upper_moon)")
    dc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    dc.add_argument("--out", required=True, help="the task's directory (a few-step run's is reused)")
    dc.add_argument("--no-progress", action="store_true")

    a = sub.add_parser("adapter", help="LoRA adapters: merge into a full checkpoint, or extract a run's")
    asub = a.add_subparsers(dest="adapter_command", required=True, metavar="{merge,extract}")
    am = asub.add_parser("merge", help="fold weighted adapters into their base: a full checkpoint")
    am.add_argument("base", help="the base checkpoint the adapters were trained on")
    am.add_argument("--adapter", dest="adapters", action="append", required=True, metavar="PATH[:WEIGHT]",
                    help="an adapter and its weight (default 1; repeatable)")
    am.add_argument("--out", required=True, help="the merged checkpoint (.pt)")
    ae = asub.add_parser("extract", help="write the adapter of a LoRA run's checkpoint alone")
    ae.add_argument("checkpoint", help="a LoRA run's checkpoint (lora.rank > 0)")
    ae.add_argument("--out", help="adapter file (default adapter.pt beside the checkpoint)")

    d = sub.add_parser("demo", help="train and benchmark the toy experiments, write report.md")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--configs", nargs="*", help="experiment YAMLs (default experiments/toy/*.yaml)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--n", type=int, default=2000)
    d.add_argument("--no-progress", action="store_true")
    return p


def _run(args: argparse.Namespace) -> int:
    import flowmatch.pipelines as pipelines
    from flowmatch.config import load_config
    from flowmatch.errors import FlowmatchError

    if args.command == "train":
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(pipelines.describe_config(cfg), end="")
            return 0
        out = args.out if args.out is not None else os.path.join("runs", cfg.name)
        summary = pipelines.train_from_config(cfg, out, resume=args.resume, overwrite=args.overwrite,
                                              progress=not args.no_progress)
        ev = summary.eval
        if not ev:  # a rank > 0 process of a distributed run: rank 0 reports
            return 0
        m = "fd" if "eval/fd" in ev else "w2"
        print(f"trained {summary.name} to step {summary.step} ({summary.steps_per_sec:.0f} steps/s) in {out}; "
              f"{m.upper()} {ev.get(f'eval/{m}', float('nan')):.4f} (floor {ev.get(f'eval/{m}_floor', float('nan')):.4f}) "
              f"with {ev.get('eval/solver')} at NFE {ev.get('eval/nfe')}; straightness {ev.get('eval/straightness', float('nan')):.4f}")
        return 0
    if args.command == "sample":
        rec = pipelines.sample_from_checkpoint(args.checkpoint, args.out, n=args.n, solver=args.solver, nfe=args.nfe,
                                               atol=args.atol, rtol=args.rtol, seed=args.seed, device=args.device,
                                               batch_size=args.batch_size, progress=not args.no_progress,
                                               adapters=args.adapters)
        print(json.dumps({k: rec[k] for k in ("solver", "num_steps", "nfe", "n", "seconds")}) + f"  -> {args.out}")
        return 0
    if args.command == "adapter":
        from flowmatch.config import check_output_path
        from flowmatch.distill import adapters

        if args.adapter_command == "merge":
            specs = [adapters.parse_adapter_spec(a) for a in args.adapters]
            check_output_path("out", args.out, kind="file")
            out = adapters.merge_adapters(args.base, specs, args.out)
            print(f"merged {len(specs)} adapter(s) into {args.base} -> {out}")
        else:
            if args.out is not None:
                check_output_path("out", args.out, kind="file")
            out = adapters.write_run_adapter(args.checkpoint, args.out)
            print(f"adapter of {args.checkpoint} -> {out} ({os.path.getsize(out):,} bytes)")
        return 0
    if args.command == "bench":
        from flowmatch.bench import MODEL_COLUMNS, pareto_table, rows_to_markdown

        t0 = time.perf_counter()
        res = pipelines.bench_checkpoints(args.checkpoints, args.out, solvers=args.solvers, nfes=args.nfe,
                                          grids=args.grids, n=args.n, grid_n=args.grid_n,
                                          likelihood_n=args.likelihood_n, seed=args.seed, atol=args.atol,
                                          rtol=args.rtol, device=args.device, tracking=args.tracking,
                                          progress=not args.no_progress)
        print(pareto_table(res.rows), end="")
        print(rows_to_markdown(res.models, MODEL_COLUMNS), end="")
        print(f"{len(res.rows)} rows in {time.perf_counter() - t0:.1f} s; wrote {args.out}/bench.json, bench.csv, "
              f"bench.md, models.json, models.md, curvature.json, pareto.md, bench_pareto.png, bench_curvature.png")
        return 0
    if args.command == "speed":
        from flowmatch.speed import speed_bench, speed_table, write_speed

        bad = sorted(set(args.sections) - {"train", "sample", "pairs", "unet"})
        if bad:
            raise FlowmatchError(f"unknown speed section(s) {', '.join(bad)}; valid: train, sample, pairs, unet")
        res = speed_bench(device=args.device, size=args.size, sections=args.sections, compile_mode=args.compile,
                          capture_mode=args.capture)
        paths = write_speed(res, args.out)
        print(speed_table(res), end="")
        print(f"{res['seconds']:.0f} s; wrote {paths['json']} and {paths['md']}")
        return 0 if all(c["ok"] for c in res["checks"]) else 1
    if args.command == "reflow" and args.reflow_command == "generate":
        from flowmatch.reflow import generate_pairs
        from flowmatch.training.distributed import cleanup, dist_info, init_distributed_from_env

        started = init_distributed_from_env()
        ok = False
        try:
            m = generate_pairs(args.teacher, args.out, args.n, solver=args.solver, nfe=args.nfe, atol=args.atol,
                               rtol=args.rtol, shard_size=args.shard_size, seed=args.seed, device=args.device,
                               progress=not args.no_progress, guidance=args.guidance, precision=args.precision)
            ok = True
        finally:
            if started:
                cleanup(sync=ok)
        if dist_info()[0] == 0:
            print(f"{m['count']} pairs in {len(m['shards'])} shards at {args.out} "
                  f"({m['solver']['name']}, {m['nfe_per_sample']:.1f} NFE per sample)")
        return 0
    if args.command == "reflow" and args.reflow_command == "run":
        from flowmatch.bench import row_metric, rows_to_markdown
        from flowmatch.reflow_chain import reflow_from_config
        from flowmatch.reports import write_reflow_summary

        cfgs = [load_config(c, args.overrides) for c in args.configs]
        names = [c.name for c in cfgs]
        if len(set(names)) != len(names):
            raise FlowmatchError(f"reflow run: two configs share a name ({', '.join(names)})")
        all_rows = []
        for cfg in cfgs:
            rows = reflow_from_config(cfg, os.path.join(args.out, cfg.name), rounds=args.rounds,
                                       distill=args.distill, apt=args.apt, progress=not args.no_progress)
            m = row_metric(rows)
            extra = ("fd", "fd_floor", "kid") if m == "fd" else ("w2", "w2_floor", "mmd")
            print(f"## {cfg.name}\n\n" + rows_to_markdown(rows, ("stage", "solver", "nfe", *extra, "straightness")))
            all_rows += rows
        summary = write_reflow_summary(all_rows, args.out)
        print(summary)
        print(f"wrote {args.out}/<name>/stages.* and plots/, and {args.out}/stages.json, stages.md")
        return 0
    if args.command == "reflow" and args.reflow_command == "sweep":
        from flowmatch.bench import rows_to_markdown
        from flowmatch.reflow_chain import reflow_sweep

        cfg = load_config(args.config, args.overrides)
        rows = reflow_sweep(cfg, args.out, args.key, args.values, progress=not args.no_progress)
        print(rows_to_markdown(rows), end="")
        print(f"wrote {args.out}/sweep.json, sweep.md")
        return 0
    if args.command == "distill" and args.distill_command == "run":
        from flowmatch.few_step import FEW_STEP_METHODS, few_step_from_config, few_step_summary, write_few_step_index

        cfgs = [load_config(c, args.overrides) for c in args.configs]
        methods = args.methods or FEW_STEP_METHODS
        for cfg in cfgs:
            rows = few_step_from_config(cfg, os.path.join(args.out, cfg.name), methods=methods,
                                        progress=not args.no_progress, bench=not args.train_only)
            print(f"trained {', '.join(methods)} under {args.out}/{cfg.name} (--train-only: no table)"
                  if args.train_only else f"## {cfg.name}\n\n" + few_step_summary(rows))
        if args.train_only:
            return 0
        # every task's table under OUT, this run's and those of earlier (or parallel) runs alike
        write_few_step_index(args.out)
        print(f"wrote {args.out}/<name>/few_step.* and {args.out}/few_step.md")
        return 0
    if args.command == "distill" and args.distill_command == "compose":
        from flowmatch.bench import rows_to_markdown
        from flowmatch.few_step import composition_from_config

        rows = composition_from_config(load_config(args.config, args.overrides), args.out,
                                       style_target=args.style_target, progress=not args.no_progress)
        print(rows_to_markdown(rows, ("model", "solver", "nfe", "w2", "w2_floor", "mmd")), end="")
        print(f"wrote {args.out}/composition.json, composition.md")
        return 0
    if args.command == "demo":
        report = pipelines.run_demo(args.out, args.configs or None, overrides=args.overrides, n=args.n,
                                    progress=not args.no_progress)
        print(f"wrote {report}")
        return 0
    raise AssertionError(args.command)  # pragma: no cover


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    from flowmatch.errors import FlowmatchError

    try:
        return _run(args)
    except FlowmatchError as e:
        print(f"flowmatch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowmatch: interrupted; completed checkpoints are kept (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
