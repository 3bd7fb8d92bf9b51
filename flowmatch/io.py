"""Atomic file writes and checksums (no torch.nn; the only I/O helpers shared by every layer).

Writes go to a temporary file in the destination's directory, are fsync'ed, then renamed over the
destination, so a reader sees either the old file or the complete new one, never a torn write.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Callable

import torch

__all__ = ["atomic_write", "atomic_save", "atomic_write_text", "file_sha256"]


def atomic_write(path: str, write: Callable) -> None:
    """Call ``write(f)`` on a binary temporary file, then rename it to ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=d)
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
