"""Fault-injection benchmark: kill -9 flowmatch at random points and inside its writes, resume, compare.

For each scenario -- ``flowmatch train``, ``flowmatch reflow generate`` with one worker and with two
(``torchrun --nproc_per_node 2``, gloo), and a two-round ``flowmatch reflow run`` -- the command runs
once unbroken (the reference), then again in fresh directories, each time killed with SIGKILL (the
whole process tree) and rerun (``--resume`` for ``train``; the other commands resume by themselves):

* at a random time, drawn by a seeded RNG from a window of the reference run's timeline: before its
  first checkpoint (or shard), between its first and last, or anywhere after its first file;
* inside a write of each kind the command makes (checkpoint, metrics, shard, manifest): the output
  directory is watched (inotify on Linux, else polled every 2 ms) and the process killed the moment
  a ``.tmp-*`` temporary of that file appears (the atomic writes' temporaries) or, for
  ``metrics.jsonl`` (appended line by line, not an atomic write), the moment it grows. Which
  occurrence of the write is drawn at random from those the reference made. A kill is counted "in
  the write" when the temporary is still on disk after it. No hook in the package is needed.

A run that ends before its kill is redone (up to three times; a timed kill earlier in its window).

Each resumed run is compared with the reference: tensors of every ``.pt`` (checkpoints, pair
shards, samples) bit for bit, JSON fields and ``metrics.jsonl`` rows (timings excepted), text
files; anything of the reference missing from the resumed run, and any complete checkpoint, shard
or manifest on disk after the kill that the resume lost, counts as data lost; ``.tmp-*`` files left
behind are counted. The table goes to stdout, ``OUT/faults.md`` and ``OUT/faults.json``::

    python experiments/faults/run_faults.py --out runs/faults            # make faults (~5 min, 2 cores)
    python experiments/faults/run_faults.py --quick                      # one random kill per scenario

Finding faults is the point of the measurement: the exit status is non-zero only if the harness
itself breaks (e.g. a reference run fails).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))

TMP_PREFIX = ".tmp-"  # flowmatch.io.atomic_write's temporaries: .tmp-XXXXXXXX-<target basename>
WRITE_KINDS = ("checkpoint", "metrics", "shard", "manifest")
TIME_KIND = "random time"
# values that are timings, not results: never compared
TIMING_KEY = re.compile(r"(^|/)(seconds|steps_per_sec|samples_per_sec|wall_s|elapsed)$")
# files compared by existence only (markdown / CSV tables carry timings; plots are images)
EXISTENCE_ONLY = (".md", ".csv", ".png", ".log")
SHARD = re.compile(r"shard_\d+\.pt$")
POLL_S = 0.002


# --- what a file is ----------------------------------------------------------------------------------

def tmp_target(name: str) -> Optional[str]:
    """The basename a ``.tmp-XXXXXXXX-<basename>`` temporary is written for, or None if ``name`` is not one."""
    if not name.startswith(TMP_PREFIX):
        return None
    parts = name.split("-", 2)
    return parts[2] if len(parts) == 3 else ""


def write_kind(relpath: str) -> Optional[str]:
    """The kind of write a file (or a temporary's target) is: checkpoint, metrics, shard, manifest, or None."""
    parent, name = os.path.split(relpath)
    target = tmp_target(name)
    if target is not None:
        name = target
    if name == "metrics.jsonl":
        return "metrics"
    if name == "manifest.json":
        return "manifest"
    if SHARD.match(name):
        return "shard"
    if name.endswith(".pt") and os.path.basename(parent) == "checkpoints":
        return "checkpoint"
    return None


def list_files(root: str) -> list[str]:
    """Every regular file under ``root`` as a path relative to it, sorted (``wandb/`` skipped)."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x != "wandb")
        out += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return sorted(out)


def leftover_tmps(root: str) -> list[str]:
    return [p for p in list_files(root) if os.path.basename(p).startswith(TMP_PREFIX)]


# --- comparing two run directories -----------------------------------------------------------------

@dataclass
class Comparison:
    """How a resumed run's directory differs from the reference's (each entry names file and field)."""
    differs: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    leftover_tmp: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.differs and not self.lost


def _same_tensor(a, b) -> bool:
    """Bit for bit: dtype, shape and every byte (so NaN == NaN and -0.0 != 0.0)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous().reshape(-1), b.detach().cpu().contiguous().reshape(-1)
    try:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    except (RuntimeError, TypeError):
        return torch.equal(a, b)


def _n_differ(a, b) -> int:
    """How many elements of two same-shape tensors differ in their bits."""
    import torch

    size = a.element_size()
    a, b = a.detach().cpu().contiguous().reshape(-1), b.detach().cpu().contiguous().reshape(-1)
    try:
        return int((a.view(torch.uint8).reshape(-1, size) != b.view(torch.uint8).reshape(-1, size)).any(1).sum())
    except (RuntimeError, TypeError):
        return int((a != b).sum())


def diff_values(a: Any, b: Any, where: str, out: list[str], norm: Callable[[str], str] = lambda s: s) -> None:
    """Append to ``out`` one line per leaf where ``b`` differs from the reference ``a`` (timing keys skipped)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            out.append(f"{where}: tensor against {type(b if isinstance(a, torch.Tensor) else a).__name__}")
        elif not _same_tensor(a, b):
            what = (f"dtype/shape {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
                    if a.dtype != b.dtype or a.shape != b.shape else
                    f"{_n_differ(a, b)} of {a.numel()} elements differ")
            out.append(f"{where}: tensor {what}")
    elif isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            sub = f"{where}/{k}"
            if TIMING_KEY.search(sub):
                continue
            if k not in b:
                out.append(f"{sub}: missing")
            elif k not in a:
                out.append(f"{sub}: not in the reference")
            else:
                diff_values(a[k], b[k], sub, out, norm)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            diff_values(x, y, f"{where}[{i}]", out, norm)
    elif isinstance(a, str) and isinstance(b, str):
        if norm(a) != norm(b):
            out.append(f"{where}: {norm(a)[:80]!r} vs {norm(b)[:80]!r}")
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        out.append(f"{where}: {a!r} vs {b!r}")


def _metric_rows(path: str) -> dict:
    """``metrics.jsonl`` rows keyed by (step, what the row logs, occurrence); a torn last line is skipped."""
    rows: dict = {}
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            keys = sorted(k.split("/")[0] for k in r if k != "step")
            key = (r.get("step"), keys[0] if keys else "")
            n = sum(1 for k in rows if k[:2] == key)
            rows[key + (n,)] = r
    return rows


def _load(path: str):
    import torch

    if path.endswith(".pt"):
        return torch.load(path, map_location="cpu", weights_only=True)
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    with open(path, errors="replace") as f:
        return f.read()


def compare_runs(ref_root: str, run_root: str) -> Comparison:
    """Compare the run directory ``run_root`` with the reference ``ref_root`` (see the module docstring)."""
    ref_abs, run_abs = os.path.abspath(ref_root), os.path.abspath(run_root)

    def norm(s: str) -> str:
        return s.replace(run_abs, "<out>").replace(ref_abs, "<out>")

    c = Comparison()
    ref_files, run_files = list_files(ref_root), list_files(run_root)
    run_set = set(run_files)
    for rel in run_files:
        if os.path.basename(rel).startswith(TMP_PREFIX):
            c.leftover_tmp.append(rel)
        elif rel not in set(ref_files):
            c.extra.append(rel)
    for rel in ref_files:
        if os.path.basename(rel).startswith(TMP_PREFIX):
            continue
        if rel not in run_set:
            c.lost.append(f"{rel}: missing")
            continue
        if rel.endswith(EXISTENCE_ONLY):
            continue
        a_path, b_path = os.path.join(ref_root, rel), os.path.join(run_root, rel)
        if rel.endswith(".jsonl"):
            a, b = _metric_rows(a_path), _metric_rows(b_path)
            for k in a:
                if k not in b:
                    c.lost.append(f"{rel}: row step {k[0]} ({k[1]}) missing")
                else:
                    diff_values(a[k], b[k], f"{rel}: step {k[0]}", c.differs, norm)
            c.differs += [f"{rel}: extra row step {k[0]} ({k[1]}{', repeated' if k[2] else ''})" for k in b if k not in a]
            continue
        a = _load(a_path)
        try:
            b = _load(b_path)
        except Exception as e:  # noqa: BLE001 -- any failure to read is the finding
            c.lost.append(f"{rel}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
            continue
        if isinstance(a, str):
            if norm(a) != norm(b):
                c.differs.append(f"{rel}: text differs")
        else:
            diff_values(a, b, rel, c.differs, norm)
    return c


def readable_artifacts(root: str) -> list[str]:
    """Checkpoints, pair shards and manifests under ``root`` that load completely (relative paths)."""
    ok = []
    for rel in list_files(root):
        if write_kind(rel) in ("checkpoint", "shard", "manifest") and not os.path.basename(rel).startswith(TMP_PREFIX):
            try:
                _load(os.path.join(root, rel))
            except Exception:  # noqa: BLE001 -- torn or partial: not complete
                continue
            ok.append(rel)
    return ok


def describe_state(root: str, artifacts: list[str]) -> str:
    """What a killed run left complete on disk, e.g. ``1-RF: step 200; pairs-1RF: 2 shards``."""
    parts: dict[str, list[str]] = {}
    for rel in artifacts:
        kind = write_kind(rel)
        d = os.path.dirname(os.path.dirname(rel) if kind == "checkpoint" else rel) or "."
        if kind == "checkpoint":
            step = _load(os.path.join(root, rel)).get("step")
            parts.setdefault(d, []).append(f"checkpoint at step {step}")
        elif kind == "manifest":
            parts.setdefault(d, []).append("manifest")
    for d in {os.path.dirname(rel) or "." for rel in artifacts if write_kind(rel) == "shard"}:
        n = sum(write_kind(rel) == "shard" and (os.path.dirname(rel) or ".") == d for rel in artifacts)
        parts.setdefault(d, []).insert(0, f"{n} shards")
    return "; ".join(f"{d}: {', '.join(v)}" for d, v in sorted(parts.items())) or "no checkpoint, shard or manifest"


# --- running and killing -----------------------------------------------------------------------------

@dataclass
class Event:
    """A write seen by the poller: a temporary appeared, or metrics.jsonl grew."""
    t: float
    kind: Optional[str]
    path: str


class _Inotify:
    """Linux inotify through libc (no dependency): creations and modifications in watched directories."""
    IN_MODIFY, IN_MOVED_TO, IN_CREATE, IN_ISDIR, IN_NONBLOCK = 0x2, 0x80, 0x100, 0x40000000, 0o4000

    def __init__(self):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self.fd = libc.inotify_init1(self.IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.dirs: dict[int, str] = {}

    def add(self, path: str) -> None:
        wd = self._add(self.fd, os.fsencode(path), self.IN_CREATE | self.IN_MODIFY | self.IN_MOVED_TO)
        if wd >= 0:
            self.dirs[wd] = path

    def read(self, timeout: float) -> list[tuple[str, bool]]:
        """(path, is a directory) of each event, waiting up to ``timeout`` seconds for the first."""
        import select
        import struct

        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        out, i = [], 0
        while i + 16 <= len(data):
            wd, mask, _, n = struct.unpack_from("iIII", data, i)
            name = data[i + 16:i + 16 + n].rstrip(b"\0")
            i += 16 + n
            if wd in self.dirs and name:
                out.append((os.path.join(self.dirs[wd], os.fsdecode(name)), bool(mask & self.IN_ISDIR)))
        return out

    def close(self) -> None:
        os.close(self.fd)


class Watcher:
    """Sees new ``.tmp-*`` files and growth of ``metrics.jsonl`` files under ``root`` (which may not exist yet).

    On Linux by inotify: each creation wakes the watcher at once (a temporary that lives a millisecond
    is still seen, and the kill follows within a fraction of a millisecond); elsewhere, or if inotify
    fails, by walking the tree every poll."""

    def __init__(self, root: str, use_inotify: bool = True):
        self.root, self.seen, self.sizes = os.path.abspath(root), set(), {}
        self._ino: Optional[_Inotify] = None
        if use_inotify and sys.platform.startswith("linux"):
            try:
                self._ino = _Inotify()
                os.makedirs(os.path.dirname(self.root), exist_ok=True)
                self._ino.add(os.path.dirname(self.root))
            except (OSError, AttributeError):
                self._ino = None
        self.method = "inotify" if self._ino is not None else "polling"
        self._watched: set[str] = set()
        self._pending = self._add_tree(self.root, 0.0) if self._ino is not None and os.path.isdir(self.root) else []

    def _file(self, p: str, t: float) -> list[Event]:
        rel, f = os.path.relpath(p, self.root), os.path.basename(p)
        if f.startswith(TMP_PREFIX):
            if rel not in self.seen:
                self.seen.add(rel)
                return [Event(t, write_kind(rel), rel)]
        elif f == "metrics.jsonl":
            try:
                size = os.path.getsize(p)
            except OSError:
                return []
            grew = size > self.sizes.get(rel, 0)
            self.sizes[rel] = size
            if grew:
                return [Event(t, "metrics", rel)]
        return []

    def _add_tree(self, top: str, t: float) -> list[Event]:
        """Watch ``top`` and the directories below it; report what was written there before the watch."""
        events = []
        for d, dirs, files in os.walk(top):
            dirs[:] = sorted(x for x in dirs if x != "wandb")
            if d not in self._watched:
                self._watched.add(d)
                self._ino.add(d)
            for f in sorted(files):
                events += self._file(os.path.join(d, f), t)
        return events

    def wait(self, timeout: float, t: float) -> list[Event]:
        """The writes seen within ``timeout`` seconds (returns at the first, with inotify)."""
        if self._ino is None:
            time.sleep(timeout)
            return self.poll(t)
        events, self._pending = self._pending, []
        for p, is_dir in self._ino.read(timeout if not events else 0.0):
            if p != self.root and not p.startswith(self.root + os.sep):
                continue
            if is_dir:
                if os.path.basename(p) != "wandb":
                    events += self._add_tree(p, t)
            else:
                events += self._file(p, t)
        return events

    def poll(self, t: float) -> list[Event]:
        """Walk the tree once and report what is new since the last look."""
        events = []
        if not os.path.isdir(self.root):
            return events
        for d, dirs, files in os.walk(self.root):
            dirs[:] = [x for x in dirs if x != "wandb"]
            for f in files:
                events += self._file(os.path.join(d, f), t)
        return events

    def first_file_time(self) -> bool:
        return os.path.isdir(self.root) and any(os.scandir(self.root))

    def close(self) -> None:
        if self._ino is not None:
            self._ino.close()


@dataclass
class Fault:
    """Where to kill: at ``at`` seconds (kind "random time", drawn after ``start``, the reference's first
    file), or at the ``occurrence``-th write of ``kind``."""
    kind: str
    at: Optional[float] = None
    occurrence: Optional[int] = None
    start: float = 0.0
    window: str = ""


@dataclass
class RunResult:
    rc: Optional[int]
    seconds: float
    first_file_s: Optional[float] = None
    events: list[Event] = field(default_factory=list)
    killed_at_s: Optional[float] = None
    stderr_tail: str = ""
    detector: Optional[str] = None


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process, from /proc."""
    table = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                table[int(e)] = (int(fields[1]), int(fields[2]))
            except (OSError, ValueError, IndexError):
                continue
    return table


def _descendants(pid: int, table: Optional[dict] = None) -> dict[int, int]:
    """``pid`` and every process below it -> its process group."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(p)
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        if p in table:
            out[p] = table[p][1]
        todo += children.get(p, [])
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline_has(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


def kill_tree(proc: subprocess.Popen, known: Optional[dict[int, int]] = None, marker: Optional[str] = None) -> None:
    """SIGKILL the process, its descendants and their process groups (torchrun starts each worker in a
    session of its own), then wait until none is left.

    ``known`` (pid -> group, from an earlier look) is killed first, at once, so that a kill placed in a
    write lands before the write ends; then whatever is still found below the process, or whose command
    line holds ``marker`` (the output directory: a worker orphaned by its parent's death), is killed."""
    me = os.getpgrp()

    def _kill(groups: set[int], pids: set[int]) -> None:
        for g in groups - {me}:
            try:
                os.killpg(g, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in pids - {os.getpid()}:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    known = dict(known or {})
    _kill(set(known.values()) | {proc.pid}, set(known) | {proc.pid})
    seen = set(known) | {proc.pid}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        table = _proc_table()
        found = _descendants(proc.pid, table)
        if marker:
            found |= {p: g for p, (_, g) in table.items() if p != os.getpid() and _cmdline_has(p, marker)}
        live = {p: g for p, g in found.items() if _alive(p)}
        seen |= set(found)
        if not live and not any(_alive(p) for p in seen if p != proc.pid):
            break
        _kill(set(live.values()), set(live))
        time.sleep(0.01)
    proc.wait()


def run_command(cmd: list[str], watch_root: str, log_path: str, env: dict, fault: Optional[Fault] = None,
                timeout: float = 300.0, watch: Optional[bool] = None) -> RunResult:
    """Run ``cmd`` (output appended to ``log_path``); kill it where ``fault`` says, if it has not finished first.

    Writes under ``watch_root`` are watched (:class:`Watcher`) where they matter: with no fault (the
    reference, whose writes are counted) and for a write fault; a timed kill or a rerun
    (``watch=False``) only checks the clock, every 20 ms. ``rc`` is None if the command timed out."""
    if watch is None:
        watch = fault is None or fault.kind != TIME_KIND
    watcher = Watcher(watch_root) if watch else None
    res = RunResult(rc=None, seconds=0.0, detector=watcher.method if watcher else None)
    known: dict[int, int] = {}  # the process tree (pid -> group), refreshed every 0.1 s while watching
    t_known, timed_out = 0.0, False
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
        while True:
            t = time.monotonic() - t0
            if watcher:
                if res.first_file_s is None and watcher.first_file_time():
                    res.first_file_s = t
                res.events += watcher.wait(POLL_S, t)
            else:
                time.sleep(10 * POLL_S)
            hit = fault is not None and (
                (fault.kind == TIME_KIND and t >= fault.at) or
                (fault.kind != TIME_KIND and sum(e.kind == fault.kind for e in res.events) >= fault.occurrence))
            if hit and proc.poll() is None:  # the kill comes straight after the event: nothing in between
                kill_tree(proc, known, marker=watch_root)
                res.killed_at_s = t
                break
            if proc.poll() is not None:
                if watcher:
                    res.events += watcher.wait(0.0, t) + watcher.poll(t)
                break
            if t > timeout:
                kill_tree(proc, known, marker=watch_root)
                timed_out = True
                break
            if watcher and fault is not None and time.monotonic() - t_known > 0.1:
                known, t_known = _descendants(proc.pid), time.monotonic()
    if watcher:
        watcher.close()
    res.seconds = time.monotonic() - t0
    if not timed_out:
        res.rc = proc.returncode if res.killed_at_s is None else -signal.SIGKILL
    with open(log_path, "rb") as f:
        res.stderr_tail = f.read()[-4000:].decode(errors="replace")
    return res


# --- scenarios -----------------------------------------------------------------------------------------

@dataclass
class Scenario:
    """A command to break: ``argv(out_dir)``; ``resume_args`` appended when it is rerun after a kill."""
    name: str
    argv: Callable[[str], list[str]]
    write_kinds: tuple[str, ...]
    resume_args: tuple[str, ...] = ()
    unit: str = "checkpoint"  # the write that marks progress: random kills land before the first and between


def scenarios(teacher: str) -> list[Scenario]:
    py = sys.executable
    gen = ["reflow", "generate", "--teacher", teacher, "--n", "4000", "--shard-size", "500", "--solver", "dopri5",
           "--device", "cpu", "--no-progress"]
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
    return [
        Scenario("train", lambda d: [py, "-m", "flowmatch", "train", os.path.join(HERE, "train.yaml"), "--out", d,
                                     "--no-progress"], ("checkpoint", "metrics"), ("--resume",)),
        Scenario("reflow generate, 1 worker", lambda d: [py, "-m", "flowmatch", *gen, "--out", d], ("shard", "manifest"),
                 unit="shard"),
        Scenario("reflow generate, 2 workers", lambda d: [*torchrun, "-m", "flowmatch", "--", *gen, "--out", d],
                 ("shard", "manifest"), unit="shard"),
        Scenario("reflow run", lambda d: [py, "-m", "flowmatch", "reflow", "run", os.path.join(HERE, "chain.yaml"),
                                          "--out", d, "--no-progress"], WRITE_KINDS),
    ]


def child_env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p), OMP_NUM_THREADS="1",
               WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg")
    return env


def plan_faults(scn: Scenario, ref: RunResult, n_random: int, seed: int, rotate: int = 0) -> list[Fault]:
    """``n_random`` kills at random times, then one inside each kind of write (and after the last
    metrics row, the final evaluation's).

    The times are drawn by a seeded RNG within windows of the reference run's timeline, so that both
    cases happen: before its first ``scn.unit`` write (checkpoint or shard) and between its first and
    last; a third kill and more anywhere from the first file to the end. ``rotate`` shifts which
    window the first kill takes (so that one kill per scenario still covers both across scenarios)."""
    rng = random.Random(f"{seed}:{scn.name}")
    lo = ref.first_file_s if ref.first_file_s is not None else 0.0
    units = [e.t for e in ref.events if e.kind == scn.unit]
    windows = [("anywhere", lo, ref.seconds)]
    if units:
        windows = [(f"before the first {scn.unit}", lo, units[0]),
                   (f"between {scn.unit}s", units[0], units[-1]) if len(units) > 1 else windows[0]]
    faults = []
    for k in range(n_random):
        name, a, b = windows[(k + rotate) % len(windows)] if k < 2 else ("anywhere", lo, ref.seconds)
        faults.append(Fault(TIME_KIND, at=round(rng.uniform(a, max(a, b)), 3), start=a, window=name))
    for kind in scn.write_kinds:
        seen = sum(e.kind == kind for e in ref.events)
        faults.append(Fault(kind, occurrence=rng.randint(1, max(seen, 1))))
        if kind == "metrics" and seen > 1 and faults[-1].occurrence != seen:
            faults.append(Fault(kind, occurrence=seen))  # the last row: the final evaluation's
    return faults


def method_of(kind: str, detector: Optional[str] = None) -> str:
    """How a kill of ``kind`` is placed (``detector``: how writes were seen, inotify or polling)."""
    if kind == TIME_KIND:
        return "SIGKILL at a seeded random time"
    how = f" ({detector})" if detector else ""
    if kind == "metrics":
        return f"SIGKILL when metrics.jsonl grows{how}"
    return f"SIGKILL when its .tmp-* appears{how}"


# --- the table ------------------------------------------------------------------------------------------

COLUMNS = ("scenario", "kill kind", "method", "faults", "resumed exactly", "resumed, differs", "failed to resume",
           "data lost", "leftover .tmp")


def outcome(resume_rc: Optional[int], comparison: Optional[Comparison]) -> str:
    """'failed to resume' (non-zero exit or timeout), 'resumed exactly' or 'resumed, differs'."""
    if resume_rc != 0 or comparison is None:
        return "failed to resume"
    return "resumed exactly" if comparison.exact else "resumed, differs"


def tally(records: list[dict]) -> list[dict]:
    """One row per (scenario, kill kind) in first-seen order, plus a total row; only injected faults count."""
    rows: dict = {}
    for r in records:
        key = (r["scenario"], r["kind"])
        row = rows.setdefault(key, {"scenario": r["scenario"], "kill kind": r["kind"], "method": method_of(r["kind"], r.get("detector")),
                                    **{c: 0 for c in COLUMNS[3:]}, "in write": 0, "not injected": 0})
        if not r["injected"]:
            row["not injected"] += 1
            continue
        row["faults"] += 1
        row[r["outcome"]] += 1
        row["data lost"] += bool(r["lost"])
        row["leftover .tmp"] += bool(r["leftover_tmp"])
        row["in write"] += bool(r.get("in_write"))
    out = list(rows.values())
    for row in out:
        if row["kill kind"] not in (TIME_KIND, "metrics") and row["faults"]:
            row["method"] = row["method"].rstrip(")") + f"; in the write {row['in write']}/{row['faults']})"
    total = {"scenario": "total", "kill kind": "", "method": ""}
    total |= {c: sum(r[c] for r in out) for c in (*COLUMNS[3:], "in write", "not injected")}
    return out + [total]


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: str, rows: list[dict], records: list[dict], meta: dict) -> None:
    """``faults.json`` (rows, every fault, the settings) and ``faults.md``, both written atomically."""
    from flowmatch.io import atomic_write_text

    md = [to_markdown(rows), ""]
    md += [f"- {r['scenario']}, {r['kind']} ({r['where']}"
           + (f"; on disk: {r['on_disk_after_kill']}" if r.get("on_disk_after_kill") else "")
           + f"): {r['outcome'] if r['injected'] else 'not injected'}"
           + (f"; {r['note']}" if r.get("note") else "") for r in records]
    atomic_write_text(os.path.join(out, "faults.md"), "\n".join(md) + "\n")
    atomic_write_text(os.path.join(out, "faults.json"), json.dumps({"rows": rows, "faults": records, **meta}, indent=1))


# --- the benchmark ---------------------------------------------------------------------------------------

def _last_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("$ ")]
    errs = [ln for ln in lines if "error" in ln.lower() or "Error" in ln]
    return (errs or lines or [""])[-1].strip()[:240]


def inject(scn: Scenario, fault: Fault, ref_dir: str, work: str, env: dict, timeout: float) -> dict:
    """Kill one run of ``scn`` where ``fault`` says, rerun it, compare with the reference -> one record."""
    os.makedirs(work, exist_ok=True)
    out_dir, log = os.path.join(work, "out"), os.path.join(work, "log.txt")
    where = f"at {fault.at:.2f} s, {fault.window}" if fault.kind == TIME_KIND else f"write #{fault.occurrence}"
    rec: dict = {"scenario": scn.name, "kind": fault.kind, "where": where, "dir": work, "injected": False,
                 "outcome": None, "lost": [], "leftover_tmp": [], "differs": [], "note": ""}
    for attempt in range(1, 4):
        # a run that finishes before its kill (a faster run than the reference's, a write too quick to
        # see) is redone in a fresh directory, a timed kill halfway between the first file and its time
        broken = run_command(scn.argv(out_dir), out_dir, log, env, fault, timeout)
        rec["attempts"], rec["detector"] = attempt, broken.detector
        if broken.killed_at_s is not None or broken.rc is None:
            break
        shutil.rmtree(out_dir, ignore_errors=True)
        if fault.kind == TIME_KIND:
            fault = dataclasses.replace(fault, at=fault.start + (fault.at - fault.start) / 2)
            rec["where"] = f"at {fault.at:.2f} s, {fault.window}"
    if broken.killed_at_s is None:
        rec["note"] = (f"finished (exit {broken.rc}) before the kill, {attempt} times" if broken.rc is not None
                       else "timed out")
        return rec
    rec["injected"], rec["killed_at_s"] = True, round(broken.killed_at_s, 3)
    if fault.kind != TIME_KIND:
        # a temporary of that kind still on disk: the kill landed inside the write (metrics: right after an append)
        rec["in_write"] = (any(write_kind(p) == fault.kind for p in leftover_tmps(out_dir))
                           if fault.kind != "metrics" else None)
    after_kill = readable_artifacts(out_dir) if os.path.isdir(out_dir) else []
    rec["on_disk_after_kill"] = describe_state(out_dir, after_kill)
    resumed = run_command(scn.argv(out_dir) + list(scn.resume_args), out_dir, log, env, None, timeout, watch=False)
    rec["resume_rc"] = resumed.rc
    cmp = compare_runs(ref_dir, out_dir) if resumed.rc == 0 else None
    rec["outcome"] = outcome(resumed.rc, cmp)
    lost = [] if cmp is None else list(cmp.lost)
    gone = set(readable_artifacts(out_dir)) if os.path.isdir(out_dir) else set()
    lost += [f"{p}: complete after the kill, gone or unreadable after the resume" for p in after_kill if p not in gone]
    rec["lost"], rec["leftover_tmp"] = lost, leftover_tmps(out_dir) if os.path.isdir(out_dir) else []
    if cmp is not None:
        rec["differs"], rec["extra"] = cmp.differs[:20], cmp.extra[:20]
    notes = []
    if resumed.rc != 0:
        notes.append(f"resume exit {resumed.rc}: {_last_error(resumed.stderr_tail)}")
    notes += [f"differs: {d}" for d in rec["differs"][:3]] + [f"lost: {x}" for x in lost[:3]]
    if rec["leftover_tmp"]:
        notes.append(f"left {', '.join(rec['leftover_tmp'][:3])}")
    rec["note"] = "; ".join(notes)
    return rec


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "faults"), help="where faults.json / faults.md and work/ go")
    p.add_argument("--n", type=int, default=None,
                   help="random-time kills per scenario (default: env FAULTS_N, else 2; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="one random-time kill per scenario (plus the write kills)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times and write occurrences")
    p.add_argument("--scenarios", default=None, help="comma-separated subset of: train, generate-1, generate-2, run")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one command may run")
    args = p.parse_args(argv)
    env_n = os.environ.get("FAULTS_N", "")
    if args.n is None and env_n and not env_n.isdigit():
        p.error(f"FAULTS_N must be a whole number >= 0, got {env_n!r}")
    n_random = args.n if args.n is not None else int(env_n) if env_n else 1 if args.quick else 2
    if n_random < 0:
        p.error(f"--n must be >= 0, got {n_random}")
    keys = {"train": 0, "generate-1": 1, "generate-2": 2, "run": 3}
    chosen = list(keys.values()) if not args.scenarios else []
    for s in (args.scenarios or "").split(","):
        if s:
            if s not in keys:
                p.error(f"--scenarios: unknown {s!r}; valid: {', '.join(keys)}")
            chosen.append(keys[s])

    t_start = time.monotonic()
    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    env = child_env()
    teacher_dir = os.path.join(work, "train", "reference")
    all_scn = scenarios(os.path.join(teacher_dir, "checkpoints", "last.pt"))
    records: list[dict] = []
    refs: dict = {}
    for i, scn in enumerate(all_scn):
        if i not in chosen and not (i == 0 and any(c in (1, 2) for c in chosen)):
            continue  # train's reference is the generations' teacher
        slug = ["train", "generate-1", "generate-2", "run"][i]
        ref_dir = os.path.join(work, slug, "reference")
        os.makedirs(os.path.dirname(ref_dir), exist_ok=True)
        ref = run_command(scn.argv(ref_dir), ref_dir, os.path.join(work, slug, "reference.log"), env, None, args.timeout)
        if ref.rc != 0:
            print(f"run_faults: the unbroken {scn.name} failed (exit {ref.rc}): {_last_error(ref.stderr_tail)}",
                  file=sys.stderr)
            return 1
        refs[scn.name] = {"seconds": round(ref.seconds, 2), "first_file_s": ref.first_file_s,
                          "writes": {k: sum(e.kind == k for e in ref.events) for k in WRITE_KINDS}}
        print(f"{scn.name}: unbroken in {ref.seconds:.1f} s (first file at {ref.first_file_s or 0:.1f} s; writes seen "
              + ", ".join(f"{k} {v}" for k, v in refs[scn.name]["writes"].items() if v) + ")", flush=True)
        if i not in chosen:
            continue
        for j, fault in enumerate(plan_faults(scn, ref, n_random, args.seed, rotate=i)):
            rec = inject(scn, fault, ref_dir, os.path.join(work, slug, f"fault{j:02d}"), env, args.timeout)
            records.append(rec)
            print(f"  {fault.kind} ({rec['where']}; on disk: {rec.get('on_disk_after_kill', '-')}): "
                  f"{rec['outcome'] or 'not injected'}"
                  + (f" -- {rec['note']}" if rec["note"] else ""), flush=True)
    if refs.get("reflow generate, 1 worker") and refs.get("reflow generate, 2 workers"):
        c = compare_runs(os.path.join(work, "generate-1", "reference"), os.path.join(work, "generate-2", "reference"))
        refs["1 worker == 2 workers"] = c.exact
    rows = tally(records)
    seconds = time.monotonic() - t_start
    write_outputs(out, rows, records, {"references": refs, "seed": args.seed, "random_kills_per_scenario": n_random,
                                       "seconds": round(seconds, 1)})
    print()
    print(to_markdown(rows))
    print(f"{sum(r['injected'] for r in records)} faults in {seconds:.0f} s; {os.path.join(out, 'faults.md')}, faults.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
