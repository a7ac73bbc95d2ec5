"""Small file utilities shared by the encoder, the corpus job and training."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of_path(path: str | Path) -> str:
    """sha256 over a file, or over the sorted files of a folder (relative names included)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path``; a damaged file is a ValueError naming it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def read_json_lines(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON-lines file; a line that is not JSON
    is a ValueError naming the file and the line."""
    values = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                values.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
    return values


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_staging(parent: Path, name: str, *, folder: bool = False) -> Path:
    """A fresh hidden folder or empty file in ``parent`` to write ``name`` in before it is
    renamed into place. Not mkdtemp / mkstemp (0700 / 0600): what lands has the umask's mode,
    as readable as any other file the process writes."""
    staging = parent / f".{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if folder:
        staging.mkdir()
    else:
        staging.touch(exist_ok=False)
    return staging


def write_atomically(target: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``target`` (same folder)."""
    tmp = new_staging(target.parent, target.name)
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
