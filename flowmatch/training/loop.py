"""The training loop: AdamW with linear warm-up, gradient clipping, EMA, loss per t-bin,
atomic checkpoints and exact resume.

Run directory layout::

    RUN_DIR/config.yaml          the resolved config
    RUN_DIR/checkpoints/last.pt  {model, ema, optimizer, scheduler, step, config, rng, version}
    RUN_DIR/metrics.jsonl        one JSON row per log step (train/loss, train/loss_t{i}, ...)

Resuming restores the model, EMA, optimiser, scheduler and the data generator's state, so on the
CPU a resumed run's loss sequence equals the unbroken run's exactly.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from flowmatch.config import ExperimentConfig, config_diff, from_dict, save_config, to_dict
from flowmatch.errors import NonFiniteLossError, RunDirError
from flowmatch.models import EMA
from flowmatch.training.builders import Components, build_components
from flowmatch.training.checkpoint import load_checkpoint, save_checkpoint
from flowmatch.training.losses import cfm_loss, t_bin_sums
from flowmatch.training.tracking import Tracker, trim_metrics
from flowmatch.utils import make_generator

__all__ = ["TrainResult", "train", "prepare_run_dir", "last_checkpoint", "NUM_T_BINS", "RESUMABLE_KEYS"]

NUM_T_BINS = 10
# Keys that may differ between a run and its resumption (everything else must match).
RESUMABLE_KEYS = ("train.steps", "train.ckpt_every", "train.log_every", "train.device", "eval.", "tracking.",
                  "reflow.")
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


def _lr_lambda(warmup: int, total: int, schedule: str = "constant", min_ratio: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to ``min_ratio`` at ``total``."""

    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if schedule == "cosine":
            p = min(1.0, (s - warmup) / max(1, total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        return 1.0

    return f


def _batch_loss(model, comp: Components, tc, mix: float, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's loss: ``mix * L(pairs) + (1 - mix) * L(real data)`` for a paired coupling with
    real data mixed in (each on its own batch of ``batch_size``), else ``L(coupling)``. With
    ``mix = 0`` no pair is drawn, so the run is plain flow matching draw for draw."""
    parts = []
    if comp.real_coupling is None or mix > 0:
        x0, x1 = comp.coupling.sample(tc.batch_size, generator=gen)
        t = comp.time_sampler.sample(tc.batch_size, generator=gen, device=comp.device)
        parts.append((1.0 if comp.real_coupling is None else mix,
                      cfm_loss(model, comp.path, x0, x1, t, generator=gen, loss=tc.loss), t))
    if comp.real_coupling is not None:
        x0, x1 = comp.real_coupling.sample(tc.batch_size, generator=gen)
        t = comp.time_sampler.sample(tc.batch_size, generator=gen, device=comp.device)
        parts.append((1.0 - mix, cfm_loss(model, comp.path, x0, x1, t, generator=gen, loss=tc.loss), t))
    if len(parts) == 1:
        return parts[0][1].loss, parts[0][1].per_sample, parts[0][2]
    loss = sum(w * out.loss for w, out, _ in parts)
    return loss, torch.cat([out.per_sample for _, out, _ in parts]), torch.cat([t for _, _, t in parts])


def train(cfg: ExperimentConfig, run_dir: str, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, tracker: Optional[Tracker] = None,
          on_step: Optional[Callable[[int, float], None]] = None, finish_tracker: bool = True) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; see the module docstring. ``on_step(step, loss)`` is called
    after every optimiser step (``step`` counts from 1). With ``finish_tracker=False`` the tracker
    stays open in the result (for evaluation logs); it is always closed if training fails."""
    ckpt = prepare_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
    if ckpt is not None:  # the run's own config, with the resumable keys taken from the caller
        cfg = from_dict({**ckpt["config"], "train": {**ckpt["config"]["train"], "steps": cfg.train.steps,
                                                       "ckpt_every": cfg.train.ckpt_every,
                                                       "log_every": cfg.train.log_every,
                                                       "device": cfg.train.device},
                         "eval": to_dict(cfg.eval), "tracking": to_dict(cfg.tracking),
                         "reflow": to_dict(cfg.reflow)})
    comp = build_components(cfg, init_weights=ckpt is None)
    tc = cfg.train
    model = comp.model
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))

    ema = EMA(model, tc.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc.warmup_steps, tc.steps, tc.lr_schedule,
                                                          tc.lr_min_ratio))
    gen = make_generator(tc.seed, comp.device)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        comp.coupling.load_state_dict(ckpt.get("coupling", {}))
        gen.set_state(ckpt["rng"]["generator"].to(gen.get_state().device))
        torch.set_rng_state(ckpt["rng"]["torch"])
        start = int(ckpt["step"])
    trim_metrics(os.path.join(run_dir, "metrics.jsonl"), start)

    own_tracker = tracker is None
    if own_tracker:
        tracker = Tracker(run_dir, mode=cfg.tracking.mode, project=cfg.tracking.project,
                          name=cfg.tracking.name or cfg.name, config=to_dict(cfg))
    ckpt_path = last_checkpoint(run_dir)
    last_good = ckpt_path if ckpt is not None else None
    init_from = ckpt.get("init_from") if ckpt is not None else comp.init_from

    def save(step: int) -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "coupling": comp.coupling.state_dict(), "step": step,
            "config": to_dict(cfg), "init_from": init_from,
            "rng": {"generator": gen.get_state(), "torch": torch.get_rng_state()}})

    from tqdm.auto import tqdm  # lazy: only the loop needs it

    losses: list[float] = []
    bin_sum = torch.zeros(NUM_T_BINS, dtype=torch.float64)
    bin_cnt = torch.zeros(NUM_T_BINS, dtype=torch.float64)
    interval_losses: list[torch.Tensor] = []
    t_last, steps_since = time.perf_counter(), 0
    t_begin = time.perf_counter()
    sps = 0.0
    model.train()
    ok = False
    try:
        with tqdm(total=tc.steps, initial=start, disable=None if progress else True, desc=f"train {cfg.name}",
                  dynamic_ncols=True, leave=False) as bar:
            for step in range(start + 1, tc.steps + 1):
                loss, per_sample, t = _batch_loss(model, comp, tc, cfg.coupling.mix, gen)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(step, loss_value, last_good)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                lr = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                ema.update(model)
                losses.append(loss_value)
                interval_losses.append(loss.detach())
                s, c = t_bin_sums(per_sample, t, NUM_T_BINS)
                bin_sum += s.cpu()
                bin_cnt += c.cpu()
                steps_since += 1
                if on_step is not None:
                    on_step(step, loss_value)
                if step % tc.log_every == 0 or step == tc.steps:
                    now = time.perf_counter()
                    sps = steps_since / max(now - t_last, 1e-9)
                    row = {"train/loss": torch.stack(interval_losses).mean().item(), "train/lr": lr,
                           "train/grad_norm": float(grad_norm), "train/steps_per_sec": sps}
                    for i in range(NUM_T_BINS):
                        if bin_cnt[i] > 0:
                            row[f"train/loss_t{i}"] = (bin_sum[i] / bin_cnt[i]).item()
                    tracker.log(row, step)
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}")
                    interval_losses.clear()
                    bin_sum.zero_()
                    bin_cnt.zero_()
                    t_last, steps_since = now, 0
                if step % tc.ckpt_every == 0 or step == tc.steps:
                    save(step)
                    last_good = ckpt_path
                bar.update(1)
        ok = True
    finally:
        if own_tracker and (finish_tracker or not ok):
            tracker.finish()
    if start == tc.steps and not os.path.exists(ckpt_path):  # pragma: no cover - defensive
        save(start)
    elapsed = time.perf_counter() - t_begin
    n = tc.steps - start
    return TrainResult(run_dir=run_dir, checkpoint=ckpt_path, step=tc.steps, start_step=start, losses=losses,
                       steps_per_sec=(n / elapsed) if n else 0.0, model=ema.model, components=comp, config=cfg,
                       tracker=None if (finish_tracker or not own_tracker) else tracker)
