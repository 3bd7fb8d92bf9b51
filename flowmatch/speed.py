"""Speed benchmark of the hot loops (``flowmatch speed``, ``make gpu-bench``): training steps/s,
sampling time and reflow pair generation, each against a baseline measured in the same run.

Sections (rows of :data:`SPEED_COLUMNS`; ``ratio`` is against the row's baseline):

- ``train``: toy training steps/s, I-CFM and OT-CFM on N(0, I) -> moons, MLP of width 64 at
  batch 256, for three loops: ``reference`` (written the way common tutorials write it: a plain
  ``nn.Sequential`` with the time concatenated, Adam, both point clouds drawn on the CPU every
  step and moved to the device, the OT plan solved on the CPU, pairs and targets computed eagerly),
  ``plain`` (this package's loop: EMA, clipping, schedule, loss by t-bin, host reads every step)
  and ``fast`` (:mod:`flowmatch.training.plan`: data drawn on the device, no host synchronisation,
  foreach/fused optimiser and EMA, compiled step; on CUDA minibatch OT by Sinkhorn on the device;
  on the CPU the fused MLP step of :mod:`flowmatch.training.fused_mlp`).
- ``sample``: 10,000 points (``full``) at NFE 16 with Euler: the captured solve
  (:class:`flowmatch.solvers.CapturedSolve`, a CUDA graph on a GPU), the python loop of
  :func:`flowmatch.solvers.solve`, ``torchdiffeq.odeint(method="euler")``, and the floor
  ``NFE x`` one forward pass of the model on the same batch.
- ``pairs``: reflow pair generation (:func:`flowmatch.reflow.generate_pairs`, Euler at NFE 16 and
  dopri5) in pairs/s, shards written to a temporary directory.
- ``unet`` (opt-in: ``--sections unet``): image training throughput in images/s of the ``small``
  UNet preset (about 1 M parameters) at batch 128 on MNIST-5k (28 x 28), ``plain`` (fp32, no
  compilation, contiguous memory) against ``fast`` (the fast step with bf16 autocast, channels_last
  and torch.compile on CUDA; on the CPU the fast step in fp32).
- ``check``: each fast path against its plain path on this device: the largest difference of the
  per-step losses after N training steps and of the samples after a solve.

Times are medians over repeats after warm-up, with the device synchronised around each timed
region. The training loops take turns, round after round: a row's value is its median round, its
ratio the median of the per-round ratios to the reference (each round's loops ran back to back),
and ``rounds`` lists every round's steps/s. Sizes: ``full`` (for a GPU; at most a few minutes on an
H100) or ``small`` (a CPU run).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from flowmatch.utils import make_generator, resolve_device

__all__ = ["SPEED_COLUMNS", "SpeedSizes", "SIZES", "speed_bench", "reference_train_loop", "write_speed",
           "speed_table", "unet_config"]

SPEED_COLUMNS = ("section", "what", "variant", "value", "unit", "ratio", "baseline", "n", "device")


@dataclass(frozen=True)
class SpeedSizes:
    train_steps: int  # timed steps per training loop
    train_warmup: int
    sample_n: int
    sample_nfe: int
    sample_repeats: int
    pairs_n: int
    check_steps: int
    sample_width: int = 256  # the sampled model: MLP 3 x width (the toy experiments' size)
    unet_steps: int = 200  # timed steps of the UNet throughput section
    train_rounds: int = 5  # timed rounds of each training loop, taken in turn (the median is reported)


SIZES = {
    "full": SpeedSizes(train_steps=2000, train_warmup=50, sample_n=10_000, sample_nfe=16, sample_repeats=50,
                       pairs_n=200_000, check_steps=30, train_rounds=3),
    "small": SpeedSizes(train_steps=200, train_warmup=20, sample_n=2000, sample_nfe=16, sample_repeats=5,
                        pairs_n=10_000, check_steps=20, unet_steps=4, train_rounds=9),
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn: Callable[[], object], dev: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------- training


def _toy_config(coupling: str, dev: torch.device, *, width: int = 64, batch: int = 256, steps: int = 10_000):
    from flowmatch.config import from_dict

    cc = {"name": coupling}
    if coupling == "ot" and dev.type == "cuda":
        cc["method"] = "sinkhorn"  # on the device; the exact assignment is a CPU round trip every step
    return from_dict({
        "name": f"speed_{coupling}", "data": {"source": "gaussian", "target": "moons", "dim": 2},
        "coupling": cc, "model": {"name": "mlp", "hidden": width, "depth": 3},
        "train": {"steps": steps, "batch_size": batch, "lr": 1e-3, "warmup_steps": 0, "seed": 0,
                  "device": str(dev), "log_every": 10 ** 9, "ckpt_every": 10 ** 9},
        "tracking": {"mode": "disabled"}})


def reference_train_loop(coupling: str, steps: int, *, device: str | torch.device = "cpu", width: int = 64,
                         batch: int = 256, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """The tutorial-style loop the fast path is measured against; returns the per-step losses.

    ``coupling`` is ``independent`` (I-CFM) or ``ot`` (OT-CFM, exact plan on the CPU every step).
    """
    from flowmatch.couplings import exact_assignment
    from flowmatch.data import get_dataset

    dev = torch.device(device)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.SELU(), torch.nn.Linear(width, width),
                              torch.nn.SELU(), torch.nn.Linear(width, width), torch.nn.SELU(),
                              torch.nn.Linear(width, 2)).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    moons = get_dataset("moons", 2)
    losses = []
    for _ in range(steps):
        x0 = torch.randn(batch, 2)
        x1 = moons.sample(batch)
        if coupling == "ot":
            x1 = x1[exact_assignment(x0, x1)]
        x0, x1 = x0.to(dev), x1.to(dev)
        t = torch.rand(batch, 1, device=dev)
        xt = t * x1 + (1 - t) * x0
        ut = x1 - x0
        vt = net(torch.cat([xt, t], dim=1))
        loss = torch.mean((vt - ut) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _train_rows(dev: torch.device, sz: SpeedSizes, compile_mode: Optional[str]) -> tuple[list[dict], list[dict]]:
    from flowmatch.training.trainer import build_trainer

    rows, checks = [], []
    for coupling, label in (("independent", "I-CFM"), ("ot", "OT-CFM")):
        cfg = _toy_config(coupling, dev)
        # the reference takes as many steps as the fast loop (a tenth with its CPU OT plan: ~100
        # steps/s anywhere), the plain loop a quarter
        n = {"reference": max(20, sz.train_steps // 10) if coupling == "ot" else sz.train_steps,
             "plain": max(20, sz.train_steps // 4), "fast": sz.train_steps}
        trainers = {v: build_trainer(cfg, fast=fast, compile=comp)
                    for v, fast, comp in (("plain", False, "off"), ("fast", True, compile_mode or "auto"))}
        reference_train_loop(coupling, sz.train_warmup, device=dev)  # warm-up
        for tr in trainers.values():
            tr.run(sz.train_warmup)
            tr.sync()
        # the loops take turns, round after round; each row is the median round (a busy machine
        # slows one round, not one loop)
        sps: dict[str, list[float]] = {v: [] for v in n}
        for _ in range(sz.train_rounds):
            for v in n:
                _sync(dev)
                t0 = time.perf_counter()
                if v == "reference":
                    reference_train_loop(coupling, n[v], device=dev)
                else:
                    trainers[v].run(n[v])
                    trainers[v].sync()
                _sync(dev)
                sps[v].append(n[v] / (time.perf_counter() - t0))
        ref_sps = statistics.median(sps["reference"])
        rows.append(_row("train", label, "reference", ref_sps, "steps/s", None, "", batch_n(cfg), dev,
                         note=f"median of {sz.train_rounds} rounds of {n['reference']} steps")
                    | {"rounds": sps["reference"]})
        for v, tr in trainers.items():
            value = statistics.median(sps[v])
            # the ratio is the median of the rounds' own ratios: loops that ran back to back saw the
            # same machine
            ratio = statistics.median(a / r for a, r in zip(sps[v], sps["reference"]))
            note = (f"median of {sz.train_rounds} rounds of {n[v]} steps (ratio: median of the per-round "
                    f"ratios); compile={tr.plan.compile}" + (", fused MLP step" if tr.fused_mlp else ""))
            rows.append(_row("train", label, v, value, "steps/s", ratio, "reference", batch_n(cfg), dev, note=note)
                        | {"rounds": sps[v]})
        # the fast path computes the plain path's numbers: same losses for the first steps
        a = build_trainer(cfg, fast=False, compile="off")
        b = build_trainer(cfg, fast=True, compile=compile_mode or "auto")
        a.run(sz.check_steps)
        b.run(sz.check_steps)
        la, lb = a.sync(), b.sync()
        diff = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb))
        checks.append({"check": f"train {label}: fast vs plain, max relative loss difference over "
                                f"{sz.check_steps} steps", "value": diff, "ok": diff < 1e-3})
    return rows, checks


def unet_config(dev: torch.device, *, batch: int = 128, steps: int = 10_000, preset: str = "small"):
    """The image-throughput config: ``preset`` UNet on MNIST-5k at ``batch``."""
    from flowmatch.config import from_dict

    return from_dict({
        "name": "speed_unet", "data": {"source": "gaussian", "target": "mnist5k"},
        "model": {"name": "unet", "preset": preset},
        "train": {"steps": steps, "batch_size": batch, "lr": 2e-4, "warmup_steps": 0, "seed": 0,
                  "device": str(dev), "log_every": 10 ** 9, "ckpt_every": 10 ** 9},
        "tracking": {"mode": "disabled"}})


def _unet_rows(dev: torch.device, sz: SpeedSizes, compile_mode: Optional[str]) -> list[dict]:
    from flowmatch.training.trainer import build_trainer

    cfg = unet_config(dev)
    rows, plain_ips = [], None
    cuda = dev.type == "cuda"
    for variant, kw in (("plain", dict(fast=False, compile="off", precision="fp32", channels_last="off")),
                        ("fast", dict(fast=True, compile=(compile_mode or "auto") if cuda else "off",
                                      precision="bf16" if cuda else "fp32", channels_last="on" if cuda else "off"))):
        trainer = build_trainer(cfg, **kw)
        trainer.run(max(2, min(20, sz.unet_steps // 5)))  # warm-up (and compilation)
        trainer.sync()
        t0 = time.perf_counter()
        trainer.run(sz.unet_steps)
        trainer.sync()
        ips = sz.unet_steps * cfg.train.batch_size / (time.perf_counter() - t0)
        params = sum(p.numel() for p in trainer.model.parameters())
        note = f"{params / 1e6:.2f} M params; " + ", ".join(f"{k}={v}" for k, v in kw.items())
        rows.append(_row("unet", "UNet small, MNIST 28x28", variant, ips, "images/s",
                         None if plain_ips is None else ips / plain_ips, "" if plain_ips is None else "plain",
                         cfg.train.batch_size, dev, note=note))
        plain_ips = plain_ips or ips
    return rows


def batch_n(cfg) -> int:
    return int(cfg.train.batch_size)


# ---------------------------------------------------------------------------------------- sampling


def _sample_rows(dev: torch.device, sz: SpeedSizes, capture_mode: str) -> tuple[list[dict], list[dict]]:
    import torchdiffeq

    from flowmatch.models.mlp import MLPVelocity
    from flowmatch.solvers import CapturedSolve, solve, time_grid

    torch.manual_seed(0)
    model = MLPVelocity(dim=2, hidden=sz.sample_width, depth=3).to(dev).eval().requires_grad_(False)
    x0 = torch.randn(sz.sample_n, 2, generator=make_generator(0)).to(dev)
    nfe = sz.sample_nfe
    grid = time_grid(nfe, device=dev)
    captured = CapturedSolve(model, "euler", grid, x0, mode=capture_mode)
    b = x0.shape[0]

    def loop():
        with torch.no_grad():
            return solve(model, x0, "euler", nfe=nfe).x1

    def tdq():
        with torch.no_grad():
            return torchdiffeq.odeint(lambda t, x: model(x, t.expand(b)), x0, grid, method="euler")[-1]

    def forward():
        with torch.no_grad():
            return model(x0, grid[:1].expand(b))

    r = sz.sample_repeats
    t_fast = _timed(lambda: captured(x0), dev, r)
    t_loop = _timed(loop, dev, r)
    t_tdq = _timed(tdq, dev, r)
    t_floor = nfe * _timed(forward, dev, r * 4)
    what = f"Euler NFE {nfe}, MLP 3x{sz.sample_width}"
    rows = [
        _row("sample", what, f"fast ({captured.mode})", t_fast * 1e3, "ms", t_tdq / t_fast, "torchdiffeq euler (x faster)", b, dev),
        _row("sample", what, "python loop", t_loop * 1e3, "ms", t_tdq / t_loop, "torchdiffeq euler (x faster)", b, dev),
        _row("sample", what, "torchdiffeq euler", t_tdq * 1e3, "ms", 1.0, "torchdiffeq euler (x faster)", b, dev),
        _row("sample", what, f"floor: {nfe} x one forward", t_floor * 1e3, "ms", t_fast / t_floor,
             "fast / floor", b, dev),
    ]
    diff = float((captured(x0) - loop()).abs().max())
    checks = [{"check": f"sample: captured ({captured.mode}) vs python loop, max abs difference of {b} samples",
               "value": diff, "ok": diff < 1e-4}]
    return rows, checks


# ---------------------------------------------------------------------------------------- pairs


def _pair_rows(dev: torch.device, sz: SpeedSizes) -> list[dict]:
    from flowmatch.config import to_dict
    from flowmatch.models import build_model
    from flowmatch.reflow import generate_pairs
    from flowmatch.training.checkpoint import save_checkpoint

    cfg = _toy_config("independent", torch.device("cpu"))
    cfg.model.hidden = sz.sample_width
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.dim)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = os.path.join(tmp, "teacher.pt")
        sd = model.state_dict()
        save_checkpoint(teacher, {"model": sd, "ema": {"model": sd, "decay": 0.999, "num_updates": 0}, "step": 0,
                                  "optimizer": {}, "config": to_dict(cfg)})
        for solver, nfe, n in (("euler", 16, sz.pairs_n), ("dopri5", None, max(1000, sz.pairs_n // 10))):
            out = os.path.join(tmp, f"pairs_{solver}")
            _sync(dev)
            t0 = time.perf_counter()
            m = generate_pairs(teacher, out, n, solver=solver, nfe=nfe, shard_size=max(1000, n // 4), device=dev,
                               progress=False)
            _sync(dev)
            sec = time.perf_counter() - t0
            label = f"{solver} NFE {nfe}" if nfe else f"dopri5 (NFE {m['nfe_per_sample']:.0f})"
            rows.append(_row("pairs", "reflow pair generation", label, n / sec, "pairs/s", None, "", n, dev))
    return rows


# ---------------------------------------------------------------------------------------- driver


def _row(section, what, variant, value, unit, ratio, baseline, n, dev, note: str = "") -> dict:
    return {"section": section, "what": what, "variant": variant, "value": value, "unit": unit, "ratio": ratio,
            "baseline": baseline, "n": n, "device": str(dev), "note": note}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def speed_bench(*, device: str = "auto", size: str = "auto", sections=("train", "sample", "pairs"),
                compile_mode: Optional[str] = None, capture_mode: str = "auto") -> dict:
    """Run the sections on ``device``; ``size`` ``auto`` is ``full`` on CUDA and ``small`` elsewhere.

    Returns ``{"device", "device_name", "torch", "size", "rows", "checks", "seconds"}``.
    """
    dev = resolve_device(device)
    if size == "auto":
        size = "full" if dev.type == "cuda" else "small"
    if size not in SIZES:
        from flowmatch.errors import ConfigError

        raise ConfigError(f"unknown speed size {size!r}; valid: auto, {', '.join(SIZES)}")
    sz = SIZES[size]
    t0 = time.perf_counter()
    rows, checks = [], []
    if "train" in sections:
        r, c = _train_rows(dev, sz, compile_mode)
        rows += r
        checks += c
    if "sample" in sections:
        r, c = _sample_rows(dev, sz, capture_mode)
        rows += r
        checks += c
    if "pairs" in sections:
        rows += _pair_rows(dev, sz)
    if "unet" in sections:
        rows += _unet_rows(dev, sz, compile_mode)
    return {"device": str(dev), "device_name": _device_name(dev), "torch": torch.__version__, "size": size,
            "rows": rows, "checks": checks, "seconds": time.perf_counter() - t0}


def speed_table(result: dict) -> str:
    """Markdown: one line per row, then the checks."""
    head = f"Device: {result['device_name']} (torch {result['torch']}, size {result['size']})\n\n"
    lines = ["| section | what | variant | value | unit | ratio | against | n |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['section']} | {r['what']} | {r['variant']} | {r['value']:.4g} | {r['unit']} | {ratio} | "
                     f"{r['baseline'] or '-'} | {r['n']} |")
    lines += ["", "| check | value | ok |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']:.3g} | {'yes' if c['ok'] else 'NO'} |" for c in result["checks"]]
    return head + "\n".join(lines) + "\n"


def write_speed(result: dict, out_dir: str, name: str = "gpu_bench") -> dict:
    """``{name}.json`` and ``{name}.md`` in ``out_dir`` (written atomically)."""
    from flowmatch.io import atomic_write_text

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "md": os.path.join(out_dir, f"{name}.md")}
    atomic_write_text(paths["json"], json.dumps(result, indent=1))
    atomic_write_text(paths["md"], speed_table(result))
    return paths
