"""The training loop: AdamW with linear warm-up, gradient clipping, EMA, loss per t-bin,
atomic checkpoints and exact resume.

Run directory layout::

    RUN_DIR/config.yaml          the resolved config
    RUN_DIR/checkpoints/last.pt  {model, ema, optimizer, scheduler, step, config, rng, version}
    RUN_DIR/metrics.jsonl        one JSON row per log step (train/loss, train/loss_t{i}, ...)

Resuming restores the model, EMA, optimiser, scheduler and the data generator's state, so on the
CPU a resumed run's loss sequence equals the unbroken run's exactly.

Each optimiser step is a :class:`~flowmatch.training.fast.TrainStep`, plain or fast (``train.fast``,
``train.compile``; see :mod:`flowmatch.training.fast`). The fast step keeps the losses, the
gradient norm and the loss-per-t-bin sums on the device; the loop reads them at log and checkpoint
steps, so a non-finite loss stops the run there at the latest (reporting the step where it occurred)
and never reaches a checkpoint. A run may be resumed with the other mode.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from flowmatch.config import ExperimentConfig, config_diff, from_dict, save_config, to_dict
from flowmatch.errors import NonFiniteLossError, RunDirError
from flowmatch.training.builders import Components, build_components
from flowmatch.training.checkpoint import load_checkpoint, save_checkpoint
from flowmatch.training.fast import NUM_T_BINS, Trainer, _lr_lambda, resolve_speed  # noqa: F401 (_lr_lambda: re-export)
from flowmatch.training.losses import cfm_loss
from flowmatch.training.tracking import Tracker, trim_metrics

__all__ = ["TrainResult", "train", "prepare_run_dir", "last_checkpoint", "NUM_T_BINS", "RESUMABLE_KEYS"]

# Keys that may differ between a run and its resumption (everything else must match).
RESUMABLE_KEYS = ("train.steps", "train.ckpt_every", "train.log_every", "train.device", "train.fast",
                  "train.compile", "eval.", "tracking.", "reflow.")
RUN_FILES = ("config.yaml", "checkpoints", "metrics.jsonl")


@dataclass
class TrainResult:
    run_dir: str
    checkpoint: str
    step: int  # the final step reached
    start_step: int  # the step this invocation started from (0 unless resumed)
    losses: list = field(default_factory=list)  # per-step losses of this invocation
    steps_per_sec: float = 0.0
    model: Optional[torch.nn.Module] = None  # the EMA model (eval mode)
    components: Optional[Components] = None
    config: Optional[ExperimentConfig] = None  # the resolved config the run used
    tracker: Optional[Tracker] = None  # still open when train(..., finish_tracker=False)


def last_checkpoint(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints", "last.pt")


def _holds_run(run_dir: str) -> bool:
    return any(os.path.exists(os.path.join(run_dir, f)) for f in RUN_FILES)


def prepare_run_dir(run_dir: str, cfg: ExperimentConfig, *, resume: bool = False, overwrite: bool = False) -> Optional[dict]:
    """Check the output directory; returns the checkpoint to resume from (or ``None``).

    A directory that holds another run is refused unless ``resume`` or ``overwrite``; ``resume``
    needs a checkpoint and a config that matches the saved one (up to :data:`RESUMABLE_KEYS`).
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"output path {run_dir} exists and is not a directory")
    if resume:
        ckpt_path = last_checkpoint(run_dir)
        if not os.path.exists(ckpt_path):
            raise RunDirError(f"--resume: no checkpoint to resume from at {ckpt_path}")
        ckpt = load_checkpoint(ckpt_path)
        diff = [k for k in config_diff(ckpt["config"], to_dict(cfg))
                if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_KEYS)]
        if diff:
            raise RunDirError(f"--resume: the config differs from the run in {run_dir} at {', '.join(diff)}; "
                              f"resume with the run's own config ({os.path.join(run_dir, 'config.yaml')})")
        return ckpt
    if os.path.isdir(run_dir) and _holds_run(run_dir):
        if not overwrite:
            raise RunDirError(f"output directory {run_dir} already holds a run; pass --resume to continue it "
                              f"or --overwrite to replace it")
        for name in os.listdir(run_dir):
            p = os.path.join(run_dir, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    return None


LR_SCHEDULES = ("constant", "cosine")


def train(cfg: ExperimentConfig, run_dir: str, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, tracker: Optional[Tracker] = None,
          on_step: Optional[Callable[[int, float], None]] = None, finish_tracker: bool = True) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; see the module docstring. ``on_step(step, loss)`` is called
    after every optimiser step (``step`` counts from 1) with the loss as a float: with the fast step
    that reads the loss from the device every step, so pass a callback only when that is wanted.
    With ``finish_tracker=False`` the tracker stays open in the result (for evaluation logs); it is
    always closed if training fails."""
    resolve_speed(cfg.train.fast, cfg.train.compile)  # refuse bad values before touching run_dir
    ckpt = prepare_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
    if ckpt is not None:  # the run's own config, with the resumable keys taken from the caller
        cfg = from_dict({**ckpt["config"], "train": {**ckpt["config"]["train"], "steps": cfg.train.steps,
                                                       "ckpt_every": cfg.train.ckpt_every,
                                                       "log_every": cfg.train.log_every,
                                                       "device": cfg.train.device, "fast": cfg.train.fast,
                                                       "compile": cfg.train.compile},
                         "eval": to_dict(cfg.eval), "tracking": to_dict(cfg.tracking),
                         "reflow": to_dict(cfg.reflow)})
    comp = build_components(cfg, init_weights=ckpt is None)
    tc = cfg.train
    plan = resolve_speed(tc.fast, tc.compile, comp.device)
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))

    # cfm_loss is looked up here, at call time, so tests can patch this module's name
    trainer = Trainer(cfg, comp, fast=plan.fast, compile=plan.compile, loss_fn=cfm_loss)
    start = 0
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        start = trainer.global_step
    trim_metrics(os.path.join(run_dir, "metrics.jsonl"), start)

    own_tracker = tracker is None
    if own_tracker:
        tracker = Tracker(run_dir, mode=cfg.tracking.mode, project=cfg.tracking.project,
                          name=cfg.tracking.name or cfg.name, config=to_dict(cfg))
    ckpt_path = last_checkpoint(run_dir)
    last_good = ckpt_path if ckpt is not None else None
    init_from = ckpt.get("init_from") if ckpt is not None else comp.init_from

    def save() -> None:
        save_checkpoint(ckpt_path, {**trainer.state_dict(), "config": to_dict(cfg), "init_from": init_from})

    def checked(fn):
        """``fn()``, naming the last good checkpoint in a NonFiniteLossError."""
        try:
            return fn()
        except NonFiniteLossError as e:
            raise NonFiniteLossError(e.step, e.value, last_good) from None

    from tqdm.auto import tqdm  # lazy: only the loop needs it

    losses: list[float] = []
    interval_losses: list[torch.Tensor] = []
    t_last, steps_since = time.perf_counter(), 0
    t_begin = time.perf_counter()
    sps = 0.0
    ok = False
    try:
        with tqdm(total=tc.steps, initial=start, disable=None if progress else True, desc=f"train {cfg.name}",
                  dynamic_ncols=True, leave=False) as bar:
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
                    row = {"train/loss": torch.stack(interval_losses).mean().item(), "train/lr": out.lr,
                           "train/grad_norm": float(out.grad_norm), "train/steps_per_sec": sps}
                    bin_sum, bin_cnt = trainer.take_bins()
                    for i in range(NUM_T_BINS):
                        if bin_cnt[i] > 0:
                            row[f"train/loss_t{i}"] = (bin_sum[i] / bin_cnt[i]).item()
                    tracker.log(row, step)
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}")
                    interval_losses.clear()
                    t_last, steps_since = now, 0
                if ckpt_now:
                    save()
                    last_good = ckpt_path
                bar.update(1)
        ok = True
    finally:
        if own_tracker and (finish_tracker or not ok):
            tracker.finish()
    if start == tc.steps and not os.path.exists(ckpt_path):  # pragma: no cover - defensive
        save()
    elapsed = time.perf_counter() - t_begin
    n = tc.steps - start
    return TrainResult(run_dir=run_dir, checkpoint=ckpt_path, step=tc.steps, start_step=start, losses=losses,
                       steps_per_sec=(n / elapsed) if n else 0.0, model=trainer.ema.model, components=comp,
                       config=cfg, tracker=None if (finish_tracker or not own_tracker) else tracker)
