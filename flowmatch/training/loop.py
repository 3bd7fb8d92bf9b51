"""The training loop: AdamW with linear warm-up, gradient clipping, EMA, loss per t-bin,
atomic checkpoints and exact resume.

Run directory layout::

    RUN_DIR/config.yaml          the resolved config
    RUN_DIR/checkpoints/last.pt  {model, ema, optimizer, scheduler, step, config, rng, version}
    RUN_DIR/checkpoints/best.pt  the same at the best validation, with ``selection`` (objectives that
                                 select a model: Objective.validate)
    RUN_DIR/metrics.jsonl        one JSON row per log step (train/loss, train/loss_t{i}, the loss's extra
                                 scalars, ...) and per validation

Resuming restores the model, EMA, optimiser, scheduler and the data generator's state, so on the
CPU a resumed run's loss sequence equals the unbroken run's exactly.
Resuming also removes the temporaries that a killed atomic write left in the run directory, and a
run with no step left drops the evaluation rows at its last step (its caller evaluates it again). A
run stopped before its first checkpoint (killed, or failed to start) holds nothing worth keeping:
resuming it restarts it from step 0, saying so in one line on stderr.

Each optimiser step is one update of the run's objective (``train.objective``; see
:mod:`flowmatch.training.objectives`) by the :class:`~flowmatch.training.trainer.Trainer`, as the
plan (:mod:`flowmatch.training.plan`) resolved it once. With ``plan.fast`` the losses, the gradient
norm and the loss-per-t-bin sums stay on the device and the loop reads them at log and checkpoint
steps, so a non-finite loss stops the run there at the latest (reporting the step where it occurred)
and never reaches a checkpoint; otherwise every step's loss is read and checked before its update. A
run may be resumed under another plan (fast or not, precision, layout, fused or not); not with
another objective.

Data parallel (``torchrun --nproc_per_node N -m flowmatch train CONFIG --out DIR``): :func:`train`
starts the process group from torchrun's environment (:mod:`flowmatch.training.distributed`) and
every rank runs the loop on its own batches (rank ``r``'s generator is seeded ``seed + 1000 * r``;
the effective batch is ``N * grad_accum * batch_size``). Rank 0 alone checks and prepares the run
directory (the others take its decision, and stop with it if it refuses), writes ``config.yaml``,
``metrics.jsonl``, the tracker and the checkpoints. The logged ``train/loss`` is the mean over the
ranks, the t-bins are summed over them. A checkpoint holds rank 0's generator as ``rng`` and every
rank's generator and coupling state under ``ranks``: a run resumed with the same number of ranks
continues every rank's stream exactly (every rank loads the checkpoint); with another number, ranks
above 0 re-seed from ``(seed, rank, step)``. :class:`TrainResult` says which rank it is
(``is_main``): evaluation and summaries are rank 0's job. :func:`train` returns on every rank after
the final checkpoint is on disk.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from flowmatch.config import ExperimentConfig, config_diff, from_dict, save_config, to_dict
from flowmatch.errors import ConfigMismatchError, FlowmatchError, NonFiniteLossError, RunDirError
from flowmatch.io import file_sha256, remove_temporaries
from flowmatch.training import distributed as dist_utils
from flowmatch.training.builders import Components, build_components
from flowmatch.training.checkpoint import load_checkpoint, save_checkpoint
from flowmatch.training.objectives import unused_sections
from flowmatch.training.step import NUM_T_BINS
from flowmatch.training.trainer import Trainer
from flowmatch.training.tracking import Tracker, check_tracking, trim_metrics
from flowmatch.utils import resolve_device

__all__ = ["TrainResult", "train", "prepare_run_dir", "last_checkpoint", "holds_run", "NUM_T_BINS", "RESUMABLE_KEYS"]

# Keys that may differ between a run and its resumption (everything else must match).
RESUMABLE_KEYS = ("train.steps", "train.ckpt_every", "train.log_every", "train.device", "train.fast",
                  "train.compile", "train.fused", "train.precision", "train.channels_last", "eval.", "tracking.")
# and the sections the run's objective does not read (flowmatch.training.objectives.unused_sections)
# the train.* keys of RESUMABLE_KEYS: a resumed run takes them from the caller's config
_RESUMABLE_TRAIN = tuple(k.split(".", 1)[1] for k in RESUMABLE_KEYS if k.startswith("train."))
RUN_FILES = ("config.yaml", "checkpoints", "metrics.jsonl")
# what a run writes before its first checkpoint: removed when a run without a checkpoint is restarted
# (checkpoints/ is kept: only its temporaries are removed, so a file someone put there is not lost)
_STUB_FILES = ("config.yaml", "metrics.jsonl", "wandb_id.txt", "wandb")
# where a run writes atomically: a killed write's temporaries there are removed on resume
_WRITE_DIRS = (".", "checkpoints", "plots")


@dataclass
class TrainResult:
    run_dir: str
    checkpoint: str
    step: int  # the final step reached
    start_step: int  # the step this invocation started from (0 unless resumed)
    losses: list = field(default_factory=list)  # per-step losses of this invocation (mean over ranks)
    steps_per_sec: float = 0.0
    model: Optional[torch.nn.Module] = None  # the EMA model (eval mode)
    components: Optional[Components] = None
    config: Optional[ExperimentConfig] = None  # the resolved config the run used
    tracker: Optional[Tracker] = None  # still open when train(..., finish_tracker=False); None on rank > 0
    is_main: bool = True  # False on the ranks > 0 of a distributed run: they write, log and evaluate nothing
    rank: int = 0
    world_size: int = 1


def last_checkpoint(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints", "last.pt")


def _holds_run(run_dir: str) -> bool:
    return any(os.path.exists(os.path.join(run_dir, f)) for f in RUN_FILES)


def holds_run(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a run (finished, unfinished, or killed before its first checkpoint)."""
    return os.path.isdir(run_dir) and _holds_run(run_dir)


def _note(msg: str) -> None:
    print(f"flowmatch: {msg}", file=sys.stderr, flush=True)


def _remove(path: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


def _dotted(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _same_path(a, b) -> bool:
    """Whether two config values name the same existing file or directory (a pair store given by a
    relative path once and an absolute one the next time, or through a symlink)."""
    try:
        return isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.samefile(a, b)
    except OSError:
        return False


def prepare_run_dir(run_dir: str, cfg: ExperimentConfig, *, resume: bool = False, overwrite: bool = False) -> Optional[dict]:
    """Check the output directory; returns the checkpoint to resume from (or ``None``).

    A directory that holds another run is refused unless ``resume`` or ``overwrite``; ``resume``
    needs a config that matches the saved one (up to :data:`RESUMABLE_KEYS`; else
    :class:`ConfigMismatchError`) and removes the temporaries a killed write left in the run. A run
    stopped before its first checkpoint holds nothing worth keeping: ``resume`` restarts it (says so
    on stderr and returns ``None``). ``resume`` without any run in ``run_dir`` is refused.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"output path {run_dir} exists and is not a directory")
    if resume:
        ckpt_path = last_checkpoint(run_dir)
        if not os.path.exists(ckpt_path):
            if not holds_run(run_dir):
                raise RunDirError(f"--resume: no checkpoint to resume from at {ckpt_path}")
            # killed (or failed to start) before its first checkpoint: nothing in it is worth keeping
            for name in _STUB_FILES:
                if os.path.lexists(os.path.join(run_dir, name)):
                    _remove(os.path.join(run_dir, name))
            for d in _WRITE_DIRS:
                remove_temporaries(os.path.join(run_dir, d))
            _note(f"{run_dir} holds a run stopped before its first checkpoint: restarting it from step 0")
            return None
        stale = [p for d in _WRITE_DIRS for p in remove_temporaries(os.path.join(run_dir, d))]
        if stale:
            _note(f"removed {len(stale)} temporary file(s) left in {run_dir} by a killed write")
        ckpt = load_checkpoint(ckpt_path)
        was, now = ckpt["config"].get("train", {}).get("objective", "cfm"), cfg.train.objective
        if was != now:
            raise ConfigMismatchError(f"--resume: the run in {run_dir} trains objective {was!r}, this config "
                                      f"objective {now!r} (train.objective); resume it with its own config")
        # through from_dict: a run saved before a config key existed compares at that key's default
        saved, given = to_dict(from_dict(ckpt["config"])), to_dict(cfg)
        resumable = RESUMABLE_KEYS + tuple(f"{s}." for s in unused_sections(cfg.train.objective))
        diff = [k for k in config_diff(saved, given)
                if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in resumable)
                and not _same_path(_dotted(saved, k), _dotted(given, k))]
        if diff:
            raise ConfigMismatchError(f"--resume: the config differs from the run in {run_dir} at {', '.join(diff)}; "
                                      f"resume with the run's own config ({os.path.join(run_dir, 'config.yaml')})")
        return ckpt
    if holds_run(run_dir):
        if not overwrite:
            what = "a run" if os.path.exists(last_checkpoint(run_dir)) else "a run stopped before its first checkpoint"
            raise RunDirError(f"output directory {run_dir} already holds {what}; pass --resume to continue it "
                              f"or --overwrite to replace it")
        for name in os.listdir(run_dir):
            _remove(os.path.join(run_dir, name))
    return None


def _prepare_on_main(run_dir: str, cfg: ExperimentConfig, *, resume: bool, overwrite: bool,
                     main: bool, check: Optional[Callable[[], None]] = None) -> Optional[dict]:
    """:func:`prepare_run_dir` on rank 0; the other ranks wait for its decision (resume or not) and
    then load the same checkpoint. A refusal on rank 0 (by ``check()`` first, if given) is raised there
    and, naming it, on every other rank, so none is left waiting in a collective."""
    ckpt, error = None, None
    if main:
        try:
            if check is not None:
                check()
            ckpt = prepare_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
        except Exception as e:  # every kind: the other ranks must hear of it
            error = e
    decision = dist_utils.broadcast_object(
        None if not main else ({"error": f"{type(error).__name__}: {error}"} if error is not None
                               else {"resume": ckpt is not None}))
    if error is not None:
        raise error
    if "error" in decision:
        raise RunDirError(f"rank 0 could not prepare {run_dir}: {decision['error']}")
    if decision["resume"] and ckpt is None:
        ckpt = load_checkpoint(last_checkpoint(run_dir))
    return ckpt


def train(cfg: ExperimentConfig, run_dir: str, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, tracker: Optional[Tracker] = None,
          on_step: Optional[Callable[[int, float], None]] = None, finish_tracker: bool = True) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; see the module docstring. ``on_step(step, loss)`` is called
    after every optimiser step (``step`` counts from 1) with the loss as a float: with the fast step
    that reads the loss from the device every step, so pass a callback only when that is wanted.
    With ``finish_tracker=False`` the tracker stays open in the result (for evaluation logs); it is
    always closed if training fails.

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) this starts the process group if nobody
    has, and trains data-parallel; every rank must call it with the same arguments. ``tracker`` is
    used on rank 0 only."""
    # the backend follows the configured device: NCCL for CUDA, gloo for a CPU run on a GPU machine too
    dist_utils.init_distributed_from_env("nccl" if resolve_device(cfg.train.device).type == "cuda" else "gloo")
    rank, world = dist_utils.dist_info()
    if world > 1 and not dist_utils.is_distributed():
        raise FlowmatchError(f"WORLD_SIZE={world} but no process group is running; start distributed "
                             f"training with torchrun")
    main = rank == 0
    ckpt = _prepare_on_main(run_dir, cfg, resume=resume, overwrite=overwrite, main=main,
                            check=(lambda: check_tracking(cfg.tracking.mode)) if tracker is None else None)
    if ckpt is not None:  # the run's own config, with the resumable keys taken from the caller
        cfg = from_dict({**ckpt["config"], "train": {**ckpt["config"]["train"],
                                                       **{k: getattr(cfg.train, k) for k in _RESUMABLE_TRAIN}},
                         "eval": to_dict(cfg.eval), "tracking": to_dict(cfg.tracking),
                         **{s: to_dict(getattr(cfg, s)) for s in unused_sections(cfg.train.objective)}})
    tc = cfg.train
    device = None
    if world > 1:  # one GPU per process: cuda becomes cuda:LOCAL_RANK
        device = dist_utils.local_device(resolve_device(tc.device))
    comp = build_components(cfg, device, init_weights=ckpt is None)
    trainer = Trainer(cfg, comp)  # the objective checks its inputs and the plan is resolved before any write
    plan = trainer.plan
    if main:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    start = 0
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        start = trainer.global_step
    if main:  # no step is logged twice; a run with no step left is evaluated again at its last step
        trim_metrics(os.path.join(run_dir, "metrics.jsonl"), start, drop_eval_from=start if start == tc.steps else None)

    own_tracker = tracker is None and main
    if own_tracker:
        tracker = Tracker(run_dir, mode=cfg.tracking.mode, project=cfg.tracking.project,
                          name=cfg.tracking.name or cfg.name, config=to_dict(cfg))
    if not main:
        tracker = None
    ckpt_path = last_checkpoint(run_dir)
    last_good = ckpt_path if ckpt is not None else None
    init_from = ckpt.get("init_from") if ckpt is not None else comp.init_from
    # the initial weights' file hash, taken once at the start: the provenance of what the run builds on
    # (a LoRA run's adapter names its base by it)
    init_sha256 = ckpt.get("init_sha256") if ckpt is not None else (file_sha256(init_from) if init_from else None)

    def save() -> None:
        state = trainer.state_dict()  # a collective with several ranks: every rank gets here
        if main:
            save_checkpoint(ckpt_path, {**state, "config": to_dict(cfg), "init_from": init_from,
                                         "init_sha256": init_sha256})

    def checked(fn):
        """``fn()``, naming the last good checkpoint in a NonFiniteLossError."""
        try:
            return fn()
        except NonFiniteLossError as e:
            raise NonFiniteLossError(e.step, e.value, last_good, player=e.player) from None

    def validate(step: int) -> None:
        """The objective's model selection at ``step``: its scores logged, and a best state written
        as ``checkpoints/best.pt`` (atomically, with ``selection``)."""
        v = trainer.objective.validate(step, trainer.ema.model)
        if v is None:
            return
        if tracker is not None:
            tracker.log(v.scores, step)
        if v.best:
            state = trainer.state_dict()  # a collective with several ranks
            if main:
                save_checkpoint(os.path.join(run_dir, "checkpoints", "best.pt"),
                                {**state, "config": to_dict(cfg), "init_from": init_from,
                                 "init_sha256": init_sha256, "selection": v.selection})

    from tqdm.auto import tqdm  # lazy: only the loop needs it

    losses: list[float] = []
    interval_losses: list[torch.Tensor] = []
    t_last, steps_since = time.perf_counter(), 0
    t_begin = time.perf_counter()
    sps = 0.0
    ok = False
    try:
        with tqdm(total=tc.steps, initial=start, disable=None if progress and main else True,
                  desc=f"train {cfg.name}", dynamic_ncols=True, leave=False) as bar:
            if start == 0:
                validate(0)
            for step in range(start + 1, tc.steps + 1):
                out = checked(trainer.step)
                interval_losses.append(out.loss)
                steps_since += 1
                log_now = step % tc.log_every == 0 or step == tc.steps
                ckpt_now = step % tc.ckpt_every == 0 or step == tc.steps
                # the fast step's losses are read (and checked) only here: before logging, before a
                # checkpoint, and every step when on_step wants them
                if not plan.fast or on_step is not None or log_now or ckpt_now:
                    losses.extend(checked(trainer.read_losses))
                if on_step is not None:
                    on_step(step, losses[-1])
                if log_now:
                    now = time.perf_counter()
                    sps = steps_since / max(now - t_last, 1e-9)
                    # the step losses are means over the ranks already; the bins are summed here
                    row = {"train/loss": torch.stack(interval_losses).mean().item(), "train/lr": out.lr,
                           "train/grad_norm": float(out.grad_norm), "train/steps_per_sec": sps}
                    bin_sum, bin_cnt = trainer.take_bins()
                    for i in range(NUM_T_BINS):
                        if bin_cnt[i] > 0:
                            row[f"train/loss_t{i}"] = (bin_sum[i] / bin_cnt[i]).item()
                    row.update(trainer.take_extras())
                    if tracker is not None:
                        tracker.log(row, step)
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}")
                    interval_losses.clear()
                    t_last, steps_since = now, 0
                validate(step)  # before the checkpoint, which then holds the selection's state
                if ckpt_now:
                    save()
                    last_good = ckpt_path
                bar.update(1)
        ok = True
    finally:
        if own_tracker and (finish_tracker or not ok):
            tracker.finish()
    if start == tc.steps:  # pragma: no cover - defensive: a finished run resumed keeps its checkpoint
        state = trainer.state_dict()
        if main and not os.path.exists(ckpt_path):
            save_checkpoint(ckpt_path, {**state, "config": to_dict(cfg), "init_from": init_from,
                                         "init_sha256": init_sha256})
    # no rank returns before rank 0 has written the final checkpoint (the next stage may read it)
    dist_utils.barrier()
    elapsed = time.perf_counter() - t_begin
    n = tc.steps - start
    return TrainResult(run_dir=run_dir, checkpoint=ckpt_path, step=tc.steps, start_step=start, losses=losses,
                       steps_per_sec=(n / elapsed) if n else 0.0, model=trainer.ema.model, components=comp,
                       config=cfg, tracker=None if (finish_tracker or not own_tracker) else tracker,
                       is_main=main, rank=rank, world_size=world)
