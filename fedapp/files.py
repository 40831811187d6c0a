"""Writing files so a crash or a parallel reader never sees half of one, and errors kept to one line.

Every file fedapp writes that another process may read (checkpoints, run logs, caches, node
state, weights) goes through :func:`atomic_write`: a temporary file in the same folder,
flushed to disk, then renamed over the real name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def one_line(err: object, with_type: bool = False) -> str:
    """A message that stays one line even when it quotes a multi-line cause; ``with_type`` names the error."""
    text = " ".join(str(err).split())
    if isinstance(err, BaseException) and (with_type or not text):
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """``write(handle)`` into a temporary file beside ``path``, fsync, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; keep the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_torch_save(obj: Any, path: Path) -> Path:
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))
