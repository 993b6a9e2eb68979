"""Writing result files so that a crash, a signal or a full disk never leaves a half-written one,
with the permissions of a file opened the usual way (``0o666 & ~umask``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` (parent folders created) and return the path.

    The text goes to a temporary file in the same folder, which is then renamed over ``path``:
    a rename within one file system is atomic, so readers see the old file or the new one, never
    a truncated mix, and a failed write leaves the old file and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:  # Linux reports the umask without changing it
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then restore it
        os.umask(umask)
        return umask


def default_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open`` gives a new file. ``tempfile.mkstemp`` (atomic writes)
    and safetensors create files 0600 whatever the umask, so such files are given this mode."""
    return 0o666 & ~current_umask()


def default_folder_mode() -> int:
    """``0o777 & ~umask``: the mode ``mkdir`` gives a new folder (``tempfile.mkdtemp`` gives 0700)."""
    return 0o777 & ~current_umask()


def make_readable(folder: str | Path) -> None:
    """Give every file in ``folder`` (not below) :func:`default_file_mode`, e.g. after a library
    wrote them 0600."""
    mode = default_file_mode()
    for path in Path(folder).iterdir():
        if path.is_file():
            os.chmod(path, mode)
