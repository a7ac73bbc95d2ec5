"""Card tables of tuned attention configs: buckets, lookup, fallback, malformed tables, the
compile check's record of the tuning space, and the tuner's choice (on the interpreter)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from llm2vec_fast.kernels import attention, tuning, varlen_attention

ROOT = Path(__file__).resolve().parents[1]
Config, Key = tuning.Config, tuning.Key


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch) -> Path:
    """Tables and the space record read from ``tmp_path``, caches emptied before and after."""
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(tuning, "SPACE_DIR", tmp_path / "space")
    monkeypatch.setattr(tuning, "_card_of_device", lambda index: "Fake-GPU-80GB")
    caches = (tuning.table_for_card, tuning.backward_choices_for_card, tuning.compiled_space)
    for cache in caches:
        cache.cache_clear()
    yield tmp_path
    for cache in caches:
        cache.cache_clear()


def key(kernel="attn_fwd", bucket=1024, **fields) -> Key:
    values = dict(head_dim=128, dtype="bfloat16", mask="full", dropout=False) | fields
    return Key(
        kernel, values["head_dim"], values["dtype"], values["mask"], values["dropout"], bucket
    )


@pytest.mark.parametrize(
    "max_seqlen, bucket",
    [(0, 128), (1, 128), (128, 128), (129, 1024), (1024, 1024), (4097, 16384), (10**6, 16384)],
)
def test_length_bucket_is_the_smallest_that_holds_the_longest_sequence(max_seqlen, bucket):
    assert tuning.length_bucket(max_seqlen) == bucket


def test_key_of_a_call():
    got = Key.of(
        "attn_bwd_dq",
        96,
        torch.float16,
        causal=True,
        windowed=True,
        dropout=True,
        max_seqlen=300,
    )
    assert got == Key("attn_bwd_dq", 96, "float16", "causal-window", True, 1024)
    with pytest.raises(ValueError, match="max_seqlen must be >= 0"):
        tuning.length_bucket(-1)
    with pytest.raises(ValueError, match="unknown kernel 'attn_bwd'"):
        Key.of("attn_bwd", 64, torch.float16, causal=0, windowed=0, dropout=0, max_seqlen=1)


@pytest.mark.parametrize(
    "device_name, card",
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),
        ("NVIDIA H200", "NVIDIA-H200"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA-A100-SXM4-40GB"),
        (" Tesla T4/(x) ", "Tesla-T4-x"),
    ],
)
def test_card_name_is_a_safe_file_name(device_name, card):
    assert tuning.card_name(device_name) == card


def test_card_name_refuses_an_empty_name():
    with pytest.raises(ValueError, match="no usable card name"):
        tuning.card_name(" / ")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_the_space_holds_the_heuristic_configs_and_only_launchable_ones(
    head_dim, dtype, monkeypatch
):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU heuristics, not the interpreter's
    for kernel, heuristic in attention._configs(head_dim, dtype).items():
        space = tuning.config_space(kernel, dtype)
        assert heuristic in [c.launch_options() for c in space]
        assert all(tuning.config_problem(kernel, c) is None for c in space)


def test_config_problems_name_the_rule():
    assert "multiple of BLOCK_N" in tuning.config_problem("attn_fwd", Config(64, 128, 4, 2))
    assert "multiple of BLOCK_M" in tuning.config_problem("attn_bwd_dkdv", Config(64, 32, 4, 2))
    assert "powers of two" in tuning.config_problem("attn_fwd", Config(96, 32, 4, 2))
    assert "num_warps" in tuning.config_problem("attn_fwd", Config(64, 32, 3, 2))
    tma_dq = Config(64, 32, 4, 2, kv_tma=True)
    assert "only the forward kernel reads K and V by TMA" in tuning.config_problem(
        "attn_bwd_dq", tma_dq
    )


def write_table(path: Path, entries: list) -> Path:
    path.write_text(json.dumps({"format": 1, "device_name": "Fake GPU", "entries": entries}))
    return path


def entry(k: Key, config: dict | None = None) -> dict:
    config = config or dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return {**k.to_json(), "config": config}


def test_a_table_round_trips(tmp_path):
    table = {
        key(): Config(128, 64, 8, 3),
        key("attn_fwd", head_dim=64): Config(128, 128, 8, 2, kv_tma=True),
        key("attn_bwd_dkdv", 128): Config(32, 128, 8, 2),
    }
    path = tmp_path / "t.json"
    path.write_text(json.dumps(tuning.table_json(table, device_name="Fake GPU", triton="3.6.0")))
    assert tuning.load_table(path) == table


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not a readable JSON tuning table"),
        (json.dumps({"entries": []}), 'expected an object with "format": 1'),
        (json.dumps({"format": 1, "entries": {}}), '"entries" must be a list'),
        (json.dumps({"format": 1, "entries": [[1]]}), "entry 0: an entry must be an object"),
        (
            json.dumps({"format": 1, "entries": [{**entry(key()), "kernel": "attn"}]}),
            "entry 0: kernel 'attn' is not one of",
        ),
        (
            json.dumps({"format": 1, "entries": [{**entry(key()), "length_bucket": 100}]}),
            "entry 0: length_bucket 100 is not one of",
        ),
        (
            json.dumps({"format": 1, "entries": [{**entry(key()), "dropout": 0}]}),
            "entry 0: dropout must be true or false",
        ),
        (
            json.dumps(
                {
                    "format": 1,
                    "entries": [
                        entry(key()),
                        entry(key(), dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)),
                    ],
                }
            ),
            "entry 1: config .* cannot run attn_fwd: .*multiple of BLOCK_N",
        ),
        (
            json.dumps({"format": 1, "entries": [entry(key(), dict(BLOCK_M=64, BLOCK_N=64))]}),
            "entry 0: a config must have exactly the keys",
        ),
        (
            json.dumps(
                {
                    "format": 1,
                    "entries": [
                        entry(key(), dict(BLOCK_M=64.0, BLOCK_N=64, num_warps=4, num_stages=3))
                    ],
                }
            ),
            "entry 0: config values must be integers",
        ),
        (
            json.dumps({"format": 1, "entries": [entry(key()), entry(key())]}),
            "entry 1: a second entry for",
        ),
        (
            json.dumps(
                {
                    "format": 1,
                    "entries": [
                        entry(
                            key(), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, KV_TMA=0)
                        )
                    ],
                }
            ),
            "entry 0: KV_TMA is true or absent",
        ),
    ],
    ids=[
        "not-json",
        "no-format",
        "entries-not-list",
        "entry-not-object",
        "unknown-kernel",
        "unknown-bucket",
        "dropout-not-bool",
        "config-breaks-the-kernel-rule",
        "config-missing-keys",
        "config-not-int",
        "duplicate-key",
        "kv-tma-not-true",
    ],
)
def test_a_malformed_table_is_refused_naming_file_and_entry(tmp_path, content, message):
    path = tmp_path / "Broken-Card.json"
    path.write_text(content)
    with pytest.raises(tuning.TuningTableError, match=f"Broken-Card.json: .*{message}"):
        tuning.load_table(path)


CUDA = torch.device("cuda", 0)


def test_backward_choices_round_trip_and_are_refused_when_malformed(tmp_path):
    call = key("attn_bwd_dq", 128, mask="causal", dropout=True)
    backward = {call: dict(atomic_dq=True, separate_ms=2.0, atomic_ms=1.5)}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(tuning.table_json({}, device_name="Fake GPU", backward=backward)))
    assert tuning.load_backward_choices(path) == {call: True}
    assert tuning.load_table(path) == {}
    bad = {**call.to_json(), "kernel": "attn_fwd", "atomic_dq": True}
    path.write_text(json.dumps({"format": 1, "entries": [], "backward": [bad]}))
    with pytest.raises(tuning.TuningTableError, match='t.json: backward entry 0: .*"attn_bwd_dq"'):
        tuning.load_backward_choices(path)
    twice = [{**call.to_json(), "atomic_dq": flag} for flag in (True, False)]
    path.write_text(json.dumps({"format": 1, "entries": [], "backward": twice}))
    with pytest.raises(tuning.TuningTableError, match="backward entry 1: a second entry"):
        tuning.load_backward_choices(path)


def test_the_table_picks_the_backward_of_deterministic_none(tuned_dir, monkeypatch):
    """``deterministic=None`` (the model's training default) takes the atomic-dQ backward only
    where the card's table measured it faster for the call; explicit True/False win."""
    call = key("attn_bwd_dq", 128, mask="causal", dtype="float32")
    table = tuning.table_json({}, device_name="Fake GPU", backward={call: dict(atomic_dq=True)})
    (tuned_dir / "Fake-GPU-80GB.json").write_text(json.dumps(table))
    assert tuning.atomic_dq_measured_faster(call, CUDA)
    assert not tuning.atomic_dq_measured_faster(key("attn_bwd_dq", 128, dtype="float32"), CUDA)
    assert not tuning.atomic_dq_measured_faster(call, torch.device("cpu"))

    asked = []  # the keys the launcher asks about, answered as the table above on a GPU
    monkeypatch.setattr(
        tuning,
        "atomic_dq_measured_faster",
        lambda k, device: (
            asked.append(k) or tuning.backward_choices_for_card("Fake-GPU-80GB").get(k, False)
        ),
    )
    launched = []  # the deterministic flag each call hands to the autograd function
    apply = attention.VarlenAttentionFunction.apply
    monkeypatch.setattr(
        attention.VarlenAttentionFunction,
        "apply",
        lambda *args: launched.append(args[-2]) or apply(*args),
    )
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    q = torch.randn(100, 2, 128, requires_grad=True)
    cu_seqlens = torch.tensor([0, 100], dtype=torch.int32)
    for causal, deterministic in ((True, None), (False, None), (True, True), (False, False)):
        varlen_attention(q, q, q, cu_seqlens, 100, causal=causal, deterministic=deterministic)
    assert launched == [False, True, True, False]
    assert asked == [
        Key("attn_bwd_dq", 128, "float32", mask, False, 128) for mask in ("causal", "full")
    ]
    with torch.no_grad():  # no backward will run (encoding): the table is not read
        varlen_attention(q, q, q, cu_seqlens, 100, causal=True, deterministic=None)
    assert launched[-1] is True and len(asked) == 2


def test_lookup_reads_the_card_table_once_and_falls_back_without_an_entry(tuned_dir, monkeypatch):
    write_table(tuned_dir / "Fake-GPU-80GB.json", [entry(key(bucket=128))])
    reads = []
    load = tuning.load_table
    monkeypatch.setattr(tuning, "load_table", lambda path: reads.append(path) or load(path))
    assert tuning.tuned_config(key(bucket=128), CUDA) == Config(64, 64, 4, 3)
    assert tuning.tuned_config(key(bucket=1024), CUDA) is None  # no entry: heuristics
    assert tuning.tuned_config(key(bucket=128, head_dim=64), CUDA) is None
    assert tuning.tuned_config(key(bucket=128), torch.device("cpu")) is None  # no table on CPU
    assert reads == [tuned_dir / "Fake-GPU-80GB.json"]  # read once, cached


def test_no_table_for_the_card_means_heuristics(tuned_dir):
    assert tuning.tuned_config(key(), CUDA) is None


def test_a_malformed_card_table_fails_the_launch_clearly(tuned_dir):
    (tuned_dir / "Fake-GPU-80GB.json").write_text('{"format": 1, "entries": [{"kernel": 1}]}')
    with pytest.raises(tuning.TuningTableError, match="Fake-GPU-80GB.json: entry 0: kernel 1"):
        tuning.tuned_config(key(), CUDA)


def test_forced_configs_win_and_are_restored(tuned_dir):
    write_table(tuned_dir / "Fake-GPU-80GB.json", [entry(key())])
    with tuning.forced({"attn_fwd": Config(128, 128, 8, 2)}):
        assert tuning.tuned_config(key(), CUDA) == Config(128, 128, 8, 2)
        assert tuning.tuned_config(key(), torch.device("cpu")) == Config(128, 128, 8, 2)
        assert tuning.tuned_config(key("attn_bwd_dq"), CUDA) is None
    assert tuning.tuned_config(key(), CUDA) == Config(64, 64, 4, 3)
    with pytest.raises(ValueError, match="cannot run attn_bwd_dkdv"):
        with tuning.forced({"attn_bwd_dkdv": Config(64, 32, 4, 2)}):
            pass


def test_the_launcher_runs_a_forced_config_with_the_same_numbers(monkeypatch):
    """The launchers take their config from tuning; a different tile gives the same output."""
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    kernel = attention._attn_fwd_kernel
    launched = []
    run = kernel.run

    def record(*args, **kwargs):
        launched.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", record)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(24, 1, 16, generator=gen) for _ in range(3))
    cu_seqlens = torch.tensor([0, 7, 24], dtype=torch.int32)
    heuristic = varlen_attention(q, k, v, cu_seqlens, 17)
    with tuning.forced({"attn_fwd": Config(16, 16, 4, 1)}):
        forced = varlen_attention(q, k, v, cu_seqlens, 17)
    assert launched == [(64, 32), (16, 16)]
    torch.testing.assert_close(forced, heuristic, rtol=1e-5, atol=1e-6)


def write_space(tuned_dir: Path, entries: list[dict]) -> None:
    (tuned_dir / "space").mkdir()
    (tuned_dir / "space" / "sm_90.json").write_text(json.dumps({"format": 1, "entries": entries}))


def space_entry(config: Config, fits=True, spills=0, head_dim=128, dropout=False) -> dict:
    return dict(
        kernel="attn_fwd",
        head_dim=head_dim,
        dtype="bfloat16",
        dropout=dropout,
        config=config.to_json(),
        fits=fits,
        spill_stores=spills,
        spill_loads=spills,
    )


def test_surviving_configs_drop_what_does_not_fit_or_spills_at_the_recorded_twin(tuned_dir):
    space = tuning.config_space("attn_fwd", torch.bfloat16)
    write_space(
        tuned_dir,
        [space_entry(space[0]), space_entry(space[1], fits=False), space_entry(space[2], spills=8)]
        + [space_entry(c, head_dim=64) for c in space],
    )
    assert tuning.surviving_configs("attn_fwd", 128, torch.bfloat16, False, 90) == (space[0],)
    # head dim 80 and 96 pad to 128, fp16 tiles are bf16's: the same record
    assert tuning.surviving_configs("attn_fwd", 96, torch.float16, False, 90) == (space[0],)
    assert tuning.surviving_configs("attn_fwd", 64, torch.bfloat16, False, 90) == space
    # nothing recorded for this dropout setting, for fp32, for another arch: the whole space
    assert tuning.surviving_configs("attn_fwd", 128, torch.bfloat16, True, 90) == space
    fp32 = tuning.config_space("attn_fwd", torch.float32)
    assert tuning.surviving_configs("attn_fwd", 128, torch.float32, False, 90) == fp32
    # before sm_90 no TMA
    without_tma = tuple(c for c in space if not c.kv_tma)
    assert len(without_tma) < len(space)
    assert tuning.surviving_configs("attn_fwd", 128, torch.bfloat16, False, 80) == without_tma


def test_the_committed_space_record_covers_the_space_and_keeps_the_heuristics(monkeypatch):
    """Every candidate of every kernel at every recorded twin is in the record, and the
    launchers' heuristic choices survive it at head dims <= 128 (they compile, fit, do not
    spill); tests/test_kernels_compile.py checks the record against the compiler."""
    record = json.loads(tuning.space_path(90).read_text())
    recorded = {
        (e["kernel"], e["head_dim"], e["dtype"], e["dropout"], json.dumps(e["config"]))
        for e in record["entries"]
    }
    expected = {
        (kernel, head_dim, dtype, dropout, json.dumps(config.to_json()))
        for kernel in tuning.KERNELS
        for head_dim in tuning.SPACE_HEAD_DIMS
        for dtype in tuning.SPACE_DTYPES
        for dropout in (False, True)
        for config in tuning.config_space(kernel, tuning.DTYPES[dtype])
    }
    assert recorded == expected
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU heuristics, not the interpreter's
    for head_dim in (64, 80, 96, 128):
        for kernel, heuristic in attention._configs(head_dim, torch.bfloat16).items():
            for dropout in (False, True):
                survivors = tuning.surviving_configs(kernel, head_dim, torch.bfloat16, dropout, 90)
                assert Config.from_json(heuristic, kernel) in survivors, (kernel, head_dim)


def test_committed_card_tables_load_and_pick_surviving_configs():
    for path in tuning.TUNED_DIR.glob("*.json"):
        for k, config in tuning.load_table(path).items():
            dtype = tuning.DTYPES[k.dtype]
            assert config in tuning.surviving_configs(k.kernel, k.head_dim, dtype, k.dropout, 90)


def test_the_tuner_keeps_the_fastest_agreeing_config(monkeypatch, tmp_path):
    """benchmarks/tune_kernels.py on the interpreter with made-up timings: the fastest
    candidate becomes the entry, beside the current choice's time."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tune_kernels

    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    fast = Config(32, 32, 4, 2)

    def fake_ms(fn, **kwargs):
        fn()
        return 1.0 if tuning._forced.get("attn_fwd") == fast else 5.0

    monkeypatch.setattr(tune_kernels, "measure_ms", fake_ms)
    results = tune_kernels.Results("tuning", "cpu", tmp_path)
    k = tune_kernels.keys_by_value(quick=True, device="cpu")[0]
    best, best_ms = tune_kernels.measure_key(k, {}, "cpu", 0, 1, results)
    assert (best, best_ms) == (fast, 1.0)
    [record] = results.records
    assert (record["value"], record["baseline"], record["config"]["best"]) == (1.0, 5.0, str(fast))

    def same_ms(fn, **kwargs):
        fn()
        return 5.0

    monkeypatch.setattr(tune_kernels, "measure_ms", same_ms)
    assert tune_kernels.measure_key(k, {}, "cpu", 0, 1, results) == (None, 5.0)  # none beats it


def test_the_tuner_records_the_faster_backward_of_each_call():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tune_kernels

    times, backward = {}, {}
    for k, ms in (
        (key("attn_bwd_dq", 128), 3.0),  # the backward with its dQ pass
        (key("attn_fwd", 128), 1.0),  # not a backward: ignored
        (key("attn_bwd_dq", 1024), 2.0),
        (key("attn_bwd_dkdv_atomic", 128), 2.5),  # the atomic backward of the first call
    ):
        tune_kernels.note_backward_time(k, ms, times, backward)
    assert backward == {
        key("attn_bwd_dq", 128): dict(atomic_dq=True, separate_ms=3.0, atomic_ms=2.5)
    }
