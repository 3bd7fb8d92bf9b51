"""One small logger: a local ``metrics.jsonl`` always, plus wandb when ``mode`` is not ``disabled``.

wandb is imported lazily and never asks for a login: ``offline`` (the default) writes the run under
``RUN_DIR/wandb`` for a later ``wandb sync``; ``online`` needs the user's own login; ``disabled``
works without wandb installed. If wandb is missing in ``offline`` mode, a warning is printed once
and only ``metrics.jsonl`` is written. ``online`` without a login (no ``WANDB_API_KEY``, identity
token file, ``.netrc`` entry for the wandb host or key in wandb's settings file) is refused by
:func:`check_tracking` before anything is written, without asking wandb or the network.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import math
import netrc
import os
import uuid
from urllib.parse import urlsplit

import warnings
from typing import Any, Optional

from flowmatch.io import atomic_write_text

__all__ = ["Tracker", "TRACKING_MODES", "read_metrics", "trim_metrics", "check_tracking", "wandb_login_found"]

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


def trim_metrics(path: str, max_step: int, *, drop_eval_from: Optional[int] = None) -> None:
    """Keep only rows with ``step <= max_step`` (used on resume, so no step is logged twice); with
    ``drop_eval_from``, also drop the rows from that step on that hold no ``train/`` key (the
    evaluation of a run killed while evaluating, which its resumption writes again). Written atomically."""
    if not os.path.exists(path):
        return
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= max_step
            and (drop_eval_from is None or r.get("step", 0) < drop_eval_from or any(k.startswith("train/") for k in r))]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def wandb_login_found() -> bool:
    """Whether wandb would find credentials without prompting: ``WANDB_API_KEY``,
    ``WANDB_IDENTITY_TOKEN_FILE``, a ``.netrc`` entry (``$NETRC``, ``~/.netrc`` or ``~/_netrc``) for
    the host of ``WANDB_BASE_URL`` (default ``https://api.wandb.ai``), or ``api_key`` in wandb's settings
    file (``$WANDB_CONFIG_DIR/settings``, default ``~/.config/wandb/settings``). Reads files only."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    paths = ([os.environ["NETRC"]] if os.environ.get("NETRC") else []) + ["~/.netrc", "~/_netrc"]
    for p in paths:
        p = os.path.expanduser(p)
        if os.path.isfile(p):
            try:
                creds = netrc.netrc(p).authenticators(host)
            except (netrc.NetrcParseError, OSError):
                creds = None
            if creds and creds[2]:
                return True
            break  # wandb reads the first netrc file that exists
    settings = os.path.join(os.environ.get("WANDB_CONFIG_DIR") or os.path.expanduser("~/.config/wandb"), "settings")
    parser = configparser.ConfigParser()
    try:
        parser.read(settings)
    except configparser.Error:
        return False
    return bool(parser.get("default", "api_key", fallback=""))


def check_tracking(mode: str) -> None:
    """Refuse, before a run writes anything, a tracking mode that cannot start: ``online`` needs wandb
    and a wandb login (see :func:`wandb_login_found`); nothing is sent anywhere to find out."""
    from flowmatch.errors import ConfigError

    if mode not in TRACKING_MODES:
        raise ConfigError(f"unknown tracking mode {mode!r}; valid tracking modes: {', '.join(TRACKING_MODES)}")
    if mode != "online":
        return
    try:
        installed = importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        raise ConfigError("tracking.mode=online needs wandb (pip install wandb); "
                          "use tracking.mode=disabled to run without it")
    if not wandb_login_found():
        raise ConfigError("tracking.mode=online needs a wandb login (WANDB_API_KEY, or `wandb login`) and none "
                          "was found; use tracking.mode=offline (sync later with `wandb sync`) or tracking.mode=disabled")


class Tracker:
    """``log(metrics, step)``, ``log_image(key, png_path, step)``, ``log_table(key, rows)``, ``finish()``."""

    def __init__(self, run_dir: str, *, mode: str = "offline", project: str = "flowmatch",
                 name: Optional[str] = None, config: Optional[dict] = None, job_type: str = "train"):
        check_tracking(mode)  # an unknown mode, or online without wandb or a login: refused before any write
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
        try:
            self._run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=self.run_dir,
                                   mode=self.mode, config=config, job_type=job_type,
                                   settings=wandb.Settings(console="off", silent=True))
        except Exception as e:  # wandb's own errors (no login, no network) come as one line
            from flowmatch.errors import FlowmatchError

            self._file.close()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FlowmatchError(f"wandb could not start a {self.mode} run in {self.run_dir} ({type(e).__name__}: "
                                 f"{first}); use tracking.mode=offline or tracking.mode=disabled") from None

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


