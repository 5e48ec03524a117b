"""Small files that must survive a crash whole: written to a temp file, fsynced,
renamed over the old one, and the directory fsynced, so a reader finds either the
old contents or the new, never a mix (the MANIFEST, a node's cluster configuration,
the proxy's state)."""

from __future__ import annotations

import json
import os
from typing import Any


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, data: Any, indent: int | None = None) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically and durably."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(path) or ".")


def read_json(path: str) -> Any:
    """The JSON in ``path``; None if there is no such file. ValueError if it is damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is damaged: {exc}") from None
