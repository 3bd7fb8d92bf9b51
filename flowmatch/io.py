"""Atomic file writes, checksums and safe loading (no torch.nn; the only I/O helpers shared by every layer).

Writes go to a temporary file in the destination's directory, are fsync'ed, then renamed over the
destination, so a reader sees either the old file or the complete new one, never a torn write. A
writer killed mid-write leaves its temporary (``.tmp-XXXXXXXX-NAME``); :func:`remove_temporaries`
removes those of a dead writer. :func:`safe_load` is ``torch.load(weights_only=True)`` with one-line
errors that tell an unreadable file from a refused pickle.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import pickletools
import re
import sys
import tempfile
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import torch

from flowmatch.errors import FlowmatchError

__all__ = ["atomic_write", "atomic_save", "atomic_write_text", "file_sha256", "check_format", "TMP_PREFIX", "is_temporary",
           "remove_temporaries", "safe_load"]

TMP_PREFIX = ".tmp-"  # atomic_write's temporaries: TMP_PREFIX + 8 random characters + "-" + the destination's name
_TMP_RE = re.compile(r"^" + re.escape(TMP_PREFIX) + r"[A-Za-z0-9_]{8}-.+$")


def atomic_write(path: str, write: Callable) -> None:
    """Call ``write(f)`` on a binary temporary file, then rename it to ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + os.path.basename(path), dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _canonical(obj: Any) -> Any:
    """``obj`` with its dicts, lists and tuples rebuilt and every string interned, so that pickle's memo
    (which follows object identity) writes the same bytes for equal contents: a checkpoint of a run
    resumed from disk (whose strings were unpickled, not interned literals) is then the same file as the
    unbroken run's. Tensors and other objects are kept as they are (their sharing is torch's)."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if type(obj) in (dict, OrderedDict):
        out = type(obj)((_canonical(k), _canonical(v)) for k, v in obj.items())
        meta = getattr(obj, "_metadata", None)  # a module state_dict's version record
        if meta is not None:
            out._metadata = _canonical(meta)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(v) for v in obj)
    return obj


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` atomically. Equal contents give the same bytes whatever the history of the objects
    (see :func:`_canonical`), so a file's SHA-256 identifies its contents."""
    canonical = _canonical(obj)
    atomic_write(path, lambda f: torch.save(canonical, f))


def atomic_write_text(path: str, text: str) -> None:
    """Write text atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporaries."""
    return bool(_TMP_RE.match(os.path.basename(name)))


def remove_temporaries(directory: str, *, older_than: Optional[float] = None) -> list[str]:
    """Remove the temporaries a killed :func:`atomic_write` left directly in ``directory`` (only regular
    files named like them; no subdirectory is entered); returns the removed paths. With ``older_than``
    (a ``time.time()``) only those last modified before it, so a writer still at work (another worker
    of the same run) keeps its own; without it, call this only where no writer is alive (a run being
    resumed)."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        p = os.path.join(directory, name)
        if not is_temporary(name) or os.path.islink(p):
            continue
        try:
            if os.path.isfile(p) and (older_than is None or os.path.getmtime(p) < older_than):
                os.unlink(p)
                removed.append(p)
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
    return removed


_PLAIN_GLOBALS = ("torch._utils.", "torch.serialization.", "collections.OrderedDict", "_codecs.encode")


def _pickle_globals(data: bytes, max_pickles: int = 4) -> Optional[list[str]]:
    """The globals (``module.name``) imported by the pickles in ``data``, read with :mod:`pickletools`
    (nothing is executed); ``None`` if ``data`` does not start with well-formed pickles."""
    f, names, strings = io.BytesIO(data), [], []
    for _ in range(max_pickles):
        if f.tell() >= len(data):
            break
        try:
            for op, arg, _pos in pickletools.genops(f):
                if op.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]))
                elif op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # noqa: BLE001 - any malformed stream (unknown opcode, truncation) is not a pickle
            return None
    return names


def _torch_pickle_bytes(path: str) -> bytes:
    """The pickle stream of a torch file: ``data.pkl`` of a zip archive, else the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            return z.read(member) if member is not None else b""
    with open(path, "rb") as f:
        return f.read()


def safe_load(path: str, what: str, *, error: type = FlowmatchError, map_location: Any = "cpu", **kwargs) -> Any:
    """``torch.load(path, weights_only=True)`` whose every failure is one line of ``error`` naming
    ``what`` and ``path``: either the file is not readable (corrupt, truncated or not a torch file),
    or it holds pickled objects that need code to load, which are refused (and never run)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line; torch's own hints are not passed on
        if isinstance(e, OSError):  # missing, a directory, no permission: the file itself is fine or absent
            raise error(f"{what} {path} cannot be read ({type(e).__name__}: {e.strerror or e})") from None
        refused = None
        if isinstance(e, pickle.UnpicklingError):
            try:
                names = _pickle_globals(_torch_pickle_bytes(path))
            except Exception:  # noqa: BLE001 - a zip whose pickle cannot be read is corrupt
                names = None
            if names:
                foreign = [n for n in names if not n.startswith(_PLAIN_GLOBALS) and not n.endswith("Storage")]
                refused = foreign[0] if foreign else "objects beyond tensors and plain values"
        if refused is not None:
            raise error(f"{what} {path} holds a pickle that needs code to load ({refused}); refused: only tensors "
                        f"and plain values are loaded from files") from None
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
        if os.path.getsize(path) == 0:
            detail = "empty file"
        elif not zipfile.is_zipfile(path):
            detail = "neither a zip archive nor a legacy torch pickle"
        elif isinstance(e, pickle.UnpicklingError) or not first or "weights_only" in first:
            detail = "its data.pkl is not a valid pickle stream"
        else:
            detail = first
        raise error(f"{what} {path} is not a readable {what}: corrupt, truncated or not a torch file "
                    f"({detail})") from None


def check_format(obj: Any, path: str, what: str, fmt: str, version: int, required: Sequence[str], *,
                 error: type = FlowmatchError) -> dict:
    """``obj`` (a file's loaded contents) if it is a dict of format ``fmt`` and version ``version`` with
    every ``required`` entry; else a one-line ``error`` naming ``path`` and what is wrong (the one wording
    of checkpoints, adapters, ...: ``what`` names the kind, e.g. ``checkpoint``)."""
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise error(f"{path} is not a flowmatch {what} (no format={fmt!r} entry)")
    missing = [k for k in required if k not in obj]
    if missing:
        raise error(f"{what} {path} is missing entries: {', '.join(missing)}")
    if obj["version"] != version:
        raise error(f"{what} {path} has format version {obj['version']}; this flowmatch reads version {version}")
    return obj
