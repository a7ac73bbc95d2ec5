"""Launch configs of the attention kernels chosen by measurement, per card.

The tuning space lists the candidate configs (``BLOCK_M``, ``BLOCK_N``, warps, pipeline stages;
for the forward, also whether it reads K and V by TMA) of each attention kernel, today's heuristic
choices among them. ``tests/compile_kernels.py
--space`` compiles every candidate for sm_90 on a CPU and records its shared memory, registers
and spills in ``tuned/space/sm_90.json``; ``surviving_configs`` drops the candidates that do not
fit or spill there. ``benchmarks/tune_kernels.py`` measures the survivors on a GPU and writes
``tuned/<card>.json``: for each key (kernel, head dim, dtype, mask, dropout, length bucket) the
fastest config. The launchers call ``tuned_config`` first and use their own heuristics when it
returns None (no table for the card, or no entry for the key). A table's optional ``backward``
section says, per call, whether the atomic-dQ backward was the faster: ``varlen_attention(...,
deterministic=None)`` (the model's training default) follows it. A table is read once per card and
cached; a malformed one raises ``TuningTableError`` naming the file and the entry.
"""

from __future__ import annotations

import functools
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

TUNED_DIR = Path(__file__).with_name("tuned")
SPACE_DIR = TUNED_DIR / "space"
TABLE_FORMAT = 1
SPACE_FORMAT = 1

# The kernels of kernels/attention.py. ``attn_bwd_dkdv_atomic`` is the dK/dV kernel that also
# accumulates dQ with atomics (``deterministic=False``): another kernel for the compiler.
KERNELS = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dkdv_atomic", "attn_bwd_dq")
MASKS = ("full", "causal", "window", "causal-window")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Upper ends of the length buckets (tokens of the longest sequence in the batch): short texts,
# sentences to passages, long documents, very long documents.
LENGTH_BUCKETS = (128, 1024, 4096, 16384)


class TuningTableError(ValueError):
    """A tuning table or space file that cannot be used as it is."""


@dataclass(frozen=True, order=True)
class Config:
    """One launch config of an attention kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    kv_tma: bool = False  # the forward reads K and V by TMA (sm_90 and later)

    def launch_options(self) -> dict[str, int]:
        """The keyword arguments a launcher passes to the kernel (``KV_TMA`` only when set)."""
        options = dict(
            BLOCK_M=self.block_m,
            BLOCK_N=self.block_n,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )
        if self.kv_tma:
            options["KV_TMA"] = True
        return options

    def to_json(self) -> dict[str, int]:
        return self.launch_options()

    @classmethod
    def from_json(cls, value: object, kernel: str) -> Config:
        """Parse and check ``{"BLOCK_M": .., "BLOCK_N": .., "num_warps": .., "num_stages": ..}``,
        with ``"KV_TMA": true`` for a forward that reads K and V by TMA."""
        fields = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
        if not isinstance(value, dict) or set(value) - {"KV_TMA"} != set(fields):
            raise TuningTableError(
                f"a config must have exactly the keys {fields} (and optionally KV_TMA), "
                f"got {value!r}"
            )
        if not all(type(value[name]) is int for name in fields):
            raise TuningTableError(f"config values must be integers, got {value!r}")
        if value.get("KV_TMA", True) is not True:
            raise TuningTableError(f"KV_TMA is true or absent, got {value!r}")
        config = cls(*(value[name] for name in fields), kv_tma="KV_TMA" in value)
        problem = config_problem(kernel, config)
        if problem:
            raise TuningTableError(f"config {value!r} cannot run {kernel}: {problem}")
        return config


def config_problem(kernel: str, config: Config) -> str | None:
    """Why ``config`` cannot launch ``kernel`` (None when it can)."""
    blocks = (config.block_m, config.block_n)
    if any(b < 16 or b & (b - 1) for b in blocks):
        return "BLOCK_M and BLOCK_N must be powers of two >= 16 (the smallest tl.dot tile)"
    if config.num_warps not in (1, 2, 4, 8, 16):
        return "num_warps must be 1, 2, 4, 8 or 16"
    if not 1 <= config.num_stages <= 8:
        return "num_stages must be within 1..8"
    if kernel in ("attn_fwd", "attn_bwd_dq") and config.block_m % config.block_n:
        return "the query-block kernels need BLOCK_M to be a multiple of BLOCK_N"
    if kernel in ("attn_bwd_dkdv", "attn_bwd_dkdv_atomic") and config.block_n % config.block_m:
        return "the key-block kernels need BLOCK_N to be a multiple of BLOCK_M"
    if config.kv_tma and kernel != "attn_fwd":
        return "only the forward kernel reads K and V by TMA"
    return None


def _configs(*rows: tuple) -> tuple[Config, ...]:
    return tuple(Config(*row) for row in rows)


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, KV_TMA]) per kernel, for 16-bit inputs and for fp32
# (whose tiles take twice the shared memory). Each list holds the launchers' heuristic choices.
# The forward's TMA twins read K and V by TMA (a hardware copy engine, no address arithmetic in
# registers); only a measurement says whether that pays.
_FORWARD_16 = _configs(
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (64, 32, 8, 2),
    (128, 128, 8, 2),
    (128, 64, 8, 2),
    (64, 64, 4, 3),
    (128, 64, 8, 3, True),
    (128, 128, 8, 2, True),
    (128, 128, 8, 3, True),
    (64, 64, 4, 3, True),
)
_DKDV_16 = _configs(
    (32, 128, 4, 3),
    (32, 128, 8, 3),
    (16, 64, 8, 2),
    (32, 128, 8, 2),
    (16, 32, 8, 2),
    (16, 32, 8, 1),
)
_DQ_16 = _configs(
    (128, 32, 4, 3),
    (128, 32, 8, 3),
    (64, 16, 8, 2),
    (128, 64, 8, 2),
    (64, 64, 4, 3),
    (64, 32, 8, 2),
)
_QUERY_BLOCKS_32 = _configs((32, 32, 4, 1), (64, 32, 4, 1), (32, 32, 4, 2))
_KEY_BLOCKS_32 = _configs((16, 32, 4, 1), (32, 32, 4, 1), (32, 64, 4, 1), (32, 32, 4, 2))
_SPACE = {
    ("attn_fwd", False): _FORWARD_16,
    ("attn_bwd_dkdv", False): _DKDV_16,
    ("attn_bwd_dkdv_atomic", False): _DKDV_16,
    ("attn_bwd_dq", False): _DQ_16,
    ("attn_fwd", True): _QUERY_BLOCKS_32,
    ("attn_bwd_dkdv", True): _KEY_BLOCKS_32,
    ("attn_bwd_dkdv_atomic", True): _KEY_BLOCKS_32,
    ("attn_bwd_dq", True): _QUERY_BLOCKS_32,
}


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"no tuning for dtype {dtype}; expected one of {', '.join(DTYPES)}")


def config_space(kernel: str, dtype: torch.dtype) -> tuple[Config, ...]:
    """Every candidate config of ``kernel`` for inputs of ``dtype``."""
    _check_kernel(kernel)
    dtype_name(dtype)
    return _SPACE[(kernel, dtype == torch.float32)]


def mask_name(causal: bool, windowed: bool) -> str:
    return MASKS[int(causal) + 2 * int(windowed)]


def length_bucket(max_seqlen: int) -> int:
    """The smallest bucket that holds ``max_seqlen`` tokens; the largest for longer ones."""
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    return next((b for b in LENGTH_BUCKETS if max_seqlen <= b), LENGTH_BUCKETS[-1])


@dataclass(frozen=True, order=True)
class Key:
    """What a tuned config is measured for."""

    kernel: str
    head_dim: int
    dtype: str
    mask: str
    dropout: bool
    length_bucket: int

    @classmethod
    def of(
        cls,
        kernel: str,
        head_dim: int,
        dtype: torch.dtype,
        *,
        causal: bool,
        windowed: bool,
        dropout: bool,
        max_seqlen: int,
    ) -> Key:
        _check_kernel(kernel)
        return cls(
            kernel,
            head_dim,
            dtype_name(dtype),
            mask_name(causal, windowed),
            bool(dropout),
            length_bucket(max_seqlen),
        )

    def to_json(self) -> dict:
        return dict(
            kernel=self.kernel,
            head_dim=self.head_dim,
            dtype=self.dtype,
            mask=self.mask,
            dropout=self.dropout,
            length_bucket=self.length_bucket,
        )

    @classmethod
    def from_json(cls, entry: dict) -> Key:
        kernel, mask = entry.get("kernel"), entry.get("mask")
        if kernel not in KERNELS:
            raise TuningTableError(f"kernel {kernel!r} is not one of {', '.join(KERNELS)}")
        if entry.get("dtype") not in DTYPES:
            raise TuningTableError(f"dtype {entry.get('dtype')!r} is not one of {list(DTYPES)}")
        if mask not in MASKS:
            raise TuningTableError(f"mask {mask!r} is not one of {', '.join(MASKS)}")
        if type(entry.get("dropout")) is not bool:
            raise TuningTableError(f"dropout must be true or false, got {entry.get('dropout')!r}")
        if entry.get("length_bucket") not in LENGTH_BUCKETS:
            raise TuningTableError(
                f"length_bucket {entry.get('length_bucket')!r} is not one of {LENGTH_BUCKETS}"
            )
        head_dim = entry.get("head_dim")
        if type(head_dim) is not int or not 1 <= head_dim <= 256:
            raise TuningTableError(f"head_dim must be an integer in 1..256, got {head_dim!r}")
        return cls(kernel, head_dim, entry["dtype"], mask, entry["dropout"], entry["length_bucket"])


def card_name(device_name: str) -> str:
    """A file name for a card: ``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA-H100-80GB-HBM3"``."""
    name = re.sub(r"[^A-Za-z0-9.]+", "-", device_name).strip("-.")
    if not name:
        raise ValueError(f"no usable card name in {device_name!r}")
    return name


def table_path(card: str) -> Path:
    return TUNED_DIR / f"{card}.json"


def _table_data(path: Path) -> dict:
    """The JSON object of a tuning table, its format checked."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TuningTableError(f"{path}: not a readable JSON tuning table ({error})") from error
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise TuningTableError(f'{path}: expected an object with "format": {TABLE_FORMAT}')
    return data


def _entries_by_key(path: Path, entries: object, section: str, label: str, parse) -> dict:
    """``{key: value}`` from ``parse(entry) -> (key, value)`` over the list ``entries`` (the
    table's ``section``); a malformed entry or a second one for a key raises
    ``TuningTableError`` naming the file and the entry."""
    if not isinstance(entries, list):
        raise TuningTableError(f'{path}: "{section}" must be a list')
    parsed: dict = {}
    for index, entry in enumerate(entries):
        try:
            if not isinstance(entry, dict):
                raise TuningTableError(f"an entry must be an object, got {entry!r}")
            key, value = parse(entry)
        except TuningTableError as error:
            raise TuningTableError(f"{path}: {label} {index}: {error}") from None
        if key in parsed:
            raise TuningTableError(f"{path}: {label} {index}: a second entry for {key}")
        parsed[key] = value
    return parsed


def load_table(path: Path) -> dict[Key, Config]:
    """Read a tuning table; ``TuningTableError`` names the file and entry of any problem."""

    def parse(entry: dict) -> tuple[Key, Config]:
        key = Key.from_json(entry)
        return key, Config.from_json(entry.get("config"), key.kernel)

    return _entries_by_key(path, _table_data(path).get("entries"), "entries", "entry", parse)


def load_backward_choices(path: Path) -> dict[Key, bool]:
    """The optional ``"backward"`` section of a tuning table: per call (a ``Key`` of
    ``attn_bwd_dq``, the kernel the atomic backward drops), whether the atomic-dQ backward
    (``deterministic=False``) measured faster than the one with a separate dQ pass."""

    def parse(entry: dict) -> tuple[Key, bool]:
        key = Key.from_json(entry)
        if key.kernel != "attn_bwd_dq" or type(entry.get("atomic_dq")) is not bool:
            raise TuningTableError(
                'a backward choice needs "kernel": "attn_bwd_dq" and "atomic_dq": true/false'
            )
        return key, entry["atomic_dq"]

    entries = _table_data(path).get("backward", [])
    return _entries_by_key(path, entries, "backward", "backward entry", parse)


def table_json(
    table: dict[Key, Config],
    *,
    device_name: str,
    backward: dict[Key, dict] | None = None,
    **about: object,
) -> dict:
    """The JSON form ``load_table`` reads, entries sorted; ``backward`` (per ``attn_bwd_dq``
    key: ``{"atomic_dq": bool, ...timings}``) becomes the section ``load_backward_choices``
    reads; ``about`` adds fields (versions, date, timings)."""
    entries = [{**key.to_json(), "config": table[key].to_json()} for key in sorted(table)]
    data = {"format": TABLE_FORMAT, "device_name": device_name, **about, "entries": entries}
    if backward:
        data["backward"] = [{**key.to_json(), **backward[key]} for key in sorted(backward)]
    return data


@functools.lru_cache(maxsize=None)
def table_for_card(card: str) -> dict[Key, Config] | None:
    """The committed table of ``card`` (read once), None when there is none."""
    path = table_path(card)
    return load_table(path) if path.is_file() else None


@functools.lru_cache(maxsize=None)
def backward_choices_for_card(card: str) -> dict[Key, bool]:
    """The committed table's backward choices for ``card`` (read once), empty without one."""
    path = table_path(card)
    return load_backward_choices(path) if path.is_file() else {}


@functools.lru_cache(maxsize=None)
def _card_of_device(index: int) -> str:
    return card_name(torch.cuda.get_device_name(index))


_forced: dict[str, Config] = {}


@contextmanager
def forced(configs: dict[str, Config]) -> Iterator[None]:
    """Within the block, the launchers use ``configs`` (kernel name -> config) on every device,
    whatever the table says: the tuner measures candidates through the launchers this way."""
    for kernel, config in configs.items():
        _check_kernel(kernel)
        problem = config_problem(kernel, config)
        if problem:
            raise ValueError(f"{config} cannot run {kernel}: {problem}")
    saved = dict(_forced)
    _forced.update(configs)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def tuned_config(key: Key, device: torch.device) -> Config | None:
    """The config the tuner chose for ``key`` on ``device``'s card; None without a table or an
    entry (the launcher then uses its heuristics)."""
    if key.kernel in _forced:
        return _forced[key.kernel]
    if device.type != "cuda":
        return None
    table = table_for_card(_card_of_device(torch.device(device).index or 0))
    return None if table is None else table.get(key)


def atomic_dq_measured_faster(key: Key, device: torch.device) -> bool:
    """Whether the card's table says the atomic-dQ backward is the faster one for the call of
    ``key`` (an ``attn_bwd_dq`` key); False without a table or an entry."""
    if device.type != "cuda":
        return False
    card = _card_of_device(torch.device(device).index or 0)
    return backward_choices_for_card(card).get(key, False)


# The compile check records the space for these (the twins of the others: space_twin).
SPACE_HEAD_DIMS = (64, 128, 256)
SPACE_DTYPES = ("bfloat16",)


def space_twin(head_dim: int, dtype: torch.dtype) -> tuple[int, str] | None:
    """The recorded (head dim, dtype) whose kernels share the tiles of ``head_dim`` and ``dtype``:
    the head dim padded to a power of two (``BLOCK_D``), fp16 for bf16 (same tile bytes). None
    for fp32 (not recorded: its space is small enough to measure whole)."""
    if dtype == torch.float32:
        return None
    dtype_name(dtype)
    padded = max(16, 1 << (head_dim - 1).bit_length())
    return (padded, "bfloat16") if padded in SPACE_HEAD_DIMS else None


def space_path(arch: int) -> Path:
    return SPACE_DIR / f"sm_{arch}.json"


@functools.lru_cache(maxsize=None)
def compiled_space(arch: int) -> dict | None:
    """The compile check's record of the tuning space for ``sm_{arch}`` (None without one)."""
    path = space_path(arch)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != SPACE_FORMAT or not isinstance(data.get("entries"), list):
        raise TuningTableError(f'{path}: expected "format": {SPACE_FORMAT} and a list of entries')
    return data


def surviving_configs(
    kernel: str, head_dim: int, dtype: torch.dtype, dropout: bool, arch: int
) -> tuple[Config, ...]:
    """The candidates of ``kernel`` that compiled for ``sm_{arch}`` within the shared memory
    limit and without spills (at the recorded twin, ``space_twin``), in the space's order.
    Without a record for this arch, twin and dropout, every candidate (the tuner then meets the
    failures itself)."""
    space = config_space(kernel, dtype)
    if arch < 90:  # no TMA before Hopper
        space = tuple(config for config in space if not config.kv_tma)
    record = compiled_space(arch)
    twin = space_twin(head_dim, dtype)
    if record is None or twin is None:
        return space
    seen, good = set(), set()
    for entry in record["entries"]:
        if (entry["kernel"], entry["head_dim"], entry["dtype"], entry["dropout"]) == (
            kernel,
            *twin,
            dropout,
        ):
            config = Config.from_json(entry["config"], kernel)
            seen.add(config)
            if entry["fits"] and entry["spill_stores"] == entry["spill_loads"] == 0:
                good.add(config)
    if not seen:
        return space
    return tuple(c for c in space if c in good)
