"""The job folder's bookkeeping: ``manifest.json``, per-rank manifest parts, atomic writes.

A shard is done exactly when a manifest (``manifest.json`` or a rank's ``manifest.rank-R.json``)
lists it and its file has the recorded size. Every file is written under a temporary name,
fsynced and renamed, so a job killed at any moment leaves either the old or the new version.
Readers take the union of the shards listed by ``manifest.json`` and all parts, so a rank that
dies loses only the shard it was writing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from llm2vec_fast.files import fsync_dir

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
SHARDS_DIR = "shards"
FORMAT = "llm2vec-fast-embeddings"
VERSION = 1


class JobMismatchError(ValueError):
    """The folder holds a job with other settings or inputs."""


def part_name(rank: int) -> str:
    return f"manifest.rank-{rank}.json"


def temporary_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def is_temporary(path: Path) -> bool:
    return ".tmp-" in path.name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = temporary_name(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    if path.name.startswith("manifest"):
        crash_point("mid-manifest")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, value: dict) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=1, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def new_manifest(identity: dict) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "format": FORMAT,
        "version": VERSION,
        "status": "running",
        **identity,
        "shards": [],
        "counts": count_rows([]),
        "created": now,
        "updated": now,
    }


def count_rows(shards: list[dict]) -> dict:
    embedded = sum(s["embedded"] for s in shards)
    errors = sum(s["errors"] for s in shards)
    return {
        "rows_in": embedded + errors,
        "embedded": embedded,
        "errors": errors,
        "truncated": sum(s["truncated"] for s in shards),
        "shards": len(shards),
    }


def with_shards(manifest: dict, shards: dict[int, dict], **changes) -> dict:
    ordered = [shards[k] for k in sorted(shards)]
    return {
        **manifest,
        **changes,
        "shards": ordered,
        "counts": count_rows(ordered),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def identity_differences(old: dict, new: dict) -> list[str]:
    """What differs between two job identities (settings, engine, inputs), one line per change."""
    differences = []
    for key in ("settings", "engine", "inputs"):
        a, b = old.get(key), new.get(key)
        if key == "engine":
            a, b = _by_content(a), _by_content(b)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            differences += [
                f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif key == "inputs" and isinstance(a, list) and isinstance(b, list):
            differences += _input_differences(a, b)
        else:
            differences.append(f"{key}: changed")
    return differences


def _by_content(engine: dict | None) -> dict | None:
    """An engine description with its model and adapter files named by sha256 alone: the same
    files reached by another path (relative then, resolved now) are the same model."""
    if not isinstance(engine, dict):
        return engine
    same = dict(engine)
    for key in ("files", "adapters"):
        if isinstance(same.get(key), list):
            same[key] = [f.get("sha256") if isinstance(f, dict) else f for f in same[key]]
    return same


def _input_differences(old: list[dict], new: list[dict]) -> list[str]:
    """Input files added, removed or changed (size, or the sampled content), by name."""
    before = {f["path"]: f for f in old}
    after = {f["path"]: f for f in new}
    lines = [f"input {name}: new" for name in after if name not in before]
    lines += [f"input {name}: gone" for name in before if name not in after]
    for name in after.keys() & before.keys():
        a, b = before[name], after[name]
        if "sha256" not in a:
            lines.append(
                f"input {name}: recorded by an older llm2vec-fast (sampled hash),"
                " cannot be compared"
            )
        elif a["bytes"] != b["bytes"]:
            lines.append(f"input {name}: {a['bytes']:,} -> {b['bytes']:,} bytes")
        elif a != b:
            lines.append(f"input {name}: content changed")
    return sorted(lines) or ["inputs: changed"]


def load_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no embedding job ({MANIFEST} is missing)")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a manifest of {FORMAT} (format {manifest.get('format')!r})"
        )
    return manifest


def recorded_shards(folder: Path) -> dict[int, dict]:
    """Union of the shards listed by ``manifest.json`` and every rank part whose file is intact."""
    folder = Path(folder)
    sources = [folder / MANIFEST] + sorted(folder.glob("manifest.rank-*.json"))
    shards: dict[int, dict] = {}
    for source in sources:
        if not source.is_file() or is_temporary(source):
            continue
        for shard in read_json(source).get("shards", []):
            path = folder / shard["file"]
            if path.is_file() and path.stat().st_size == shard["bytes"]:
                shards[shard["index"]] = shard
    return shards


CRASH_ENV = "LLM2VEC_FAST_CORPUS_CRASH"
_crash_counts: dict[str, int] = {}


def crash_point(stage: str) -> None:
    """Test hook: ``LLM2VEC_FAST_CORPUS_CRASH=STAGE:N`` SIGKILLs this process the N-th time it
    reaches STAGE (``before-write``, ``mid-write``, ``before-rename``, ``before-manifest``,
    ``mid-manifest``), so tests can kill the job exactly where a crash is most harmful."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    wanted, _, nth = spec.partition(":")
    if wanted != stage:
        return
    _crash_counts[stage] = _crash_counts.get(stage, 0) + 1
    if _crash_counts[stage] == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
