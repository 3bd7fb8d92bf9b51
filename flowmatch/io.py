"""Atomic file writes and checksums (no torch.nn; the only I/O helpers shared by every layer).

Writes go to a temporary file in the destination's directory, are fsync'ed, then renamed over the
destination, so a reader sees either the old file or the complete new one, never a torn write.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from typing import Any, Callable

import torch

__all__ = ["atomic_write", "atomic_save", "atomic_write_text", "file_sha256", "TMP_PREFIX", "remove_stale_temporaries"]

# atomic_write's temporaries are TMP_PREFIX + mkstemp's random letters + "-" + the destination's name
TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"[a-z0-9_]+-.+")


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


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


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


def remove_stale_temporaries(directory: str, *, older_than: float) -> list[str]:
    """Remove the temporaries :func:`atomic_write` left in ``directory`` (a writer killed before its
    rename) last modified before ``older_than`` (a ``time.time()``), so a writer still at work keeps
    its own; returns the names removed. Only files named as ``atomic_write`` names them are touched."""
    removed = []
    for name in sorted(os.listdir(directory)):
        p = os.path.join(directory, name)
        if not _TMP_NAME.fullmatch(name) or os.path.islink(p):
            continue
        try:
            if os.path.isfile(p) and os.path.getmtime(p) < older_than:
                os.unlink(p)
                removed.append(name)
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
    return removed
