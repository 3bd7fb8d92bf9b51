"""One small logger: a local ``metrics.jsonl`` always, plus wandb when ``mode`` is not ``disabled``.

wandb is imported lazily and never asks for a login: ``offline`` (the default) writes the run under
``RUN_DIR/wandb`` for a later ``wandb sync``; ``online`` needs the user's own login; ``disabled``
works without wandb installed. If wandb is missing in ``offline`` mode, a warning is printed once
and only ``metrics.jsonl`` is written.
"""

from __future__ import annotations

import json
import math
import os
import uuid

import warnings
from typing import Any, Optional

__all__ = ["Tracker", "TRACKING_MODES", "read_metrics", "trim_metrics"]

TRACKING_MODES = ("offline", "online", "disabled")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def trim_metrics(path: str, max_step: int) -> None:
    """Keep only rows with ``step <= max_step`` (used on resume, so no step is logged twice)."""
    if not os.path.exists(path):
        return
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= max_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


class Tracker:
    """``log(metrics, step)``, ``log_image(key, png_path, step)``, ``log_table(key, rows)``, ``finish()``."""

    def __init__(self, run_dir: str, *, mode: str = "offline", project: str = "flowmatch",
                 name: Optional[str] = None, config: Optional[dict] = None, job_type: str = "train"):
        if mode not in TRACKING_MODES:
            from flowmatch.errors import ConfigError

            raise ConfigError(f"unknown tracking mode {mode!r}; valid tracking modes: {', '.join(TRACKING_MODES)}")
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        self.mode = mode
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.metrics_path, "a")
        self._wandb = None
        self._run = None
        if mode != "disabled":
            self._start_wandb(project, name, config, job_type)

    def _start_wandb(self, project, name, config, job_type) -> None:
        try:
            import wandb  # lazy
        except ImportError:
            if self.mode == "online":
                from flowmatch.errors import ConfigError

                raise ConfigError("tracking.mode=online needs wandb (pip install wandb); "
                                  "use tracking.mode=disabled to run without it") from None
            warnings.warn("wandb is not installed: logging to metrics.jsonl only (tracking.mode=disabled "
                          "silences this)", stacklevel=3)
            return
        id_file = os.path.join(self.run_dir, "wandb_id.txt")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_file, "w") as f:
                f.write(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self._run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=self.run_dir,
                               mode=self.mode, config=config, job_type=job_type,
                               settings=wandb.Settings(console="off", silent=True))

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._run is not None:
            self._run.log({k: _jsonable(v) for k, v in metrics.items()}, step=int(step))

    def log_image(self, key: str, path: str, step: Optional[int] = None) -> None:
        if self._run is not None:
            self._run.log({key: self._wandb.Image(path)}, step=step)

    def log_table(self, key: str, rows: list[dict], step: Optional[int] = None) -> None:
        if self._run is not None and rows:
            cols = list(rows[0])
            table = self._wandb.Table(columns=cols, data=[[_jsonable(r.get(c)) for c in cols] for r in rows])
            self._run.log({key: table}, step=step)

    def finish(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


