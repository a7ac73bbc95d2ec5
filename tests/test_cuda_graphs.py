"""CUDA graphs for encoding: the padding to graph shapes (on the CPU, through the runtime), and the
graphed encoder against the eager one (GPU)."""

import random

import pytest
import torch
from model_helpers import VOCAB, runtime_from_hf, tiny_hf_model

from llm2vec_fast import LLM2Vec
from llm2vec_fast.cuda_graphs import GraphedEncoder, memory_fingerprint
from llm2vec_fast.kernels import POOLING_MODES, masked_pool
from llm2vec_fast.packed import Packed, graph_shape, pack_batches, round_up_size
from llm2vec_fast.text import TokenizedText


@pytest.fixture(scope="module")
def runtime():
    return runtime_from_hf(tiny_hf_model("llama", seed=3)).eval()


def test_round_up_size_wastes_at_most_an_eighth():
    assert [round_up_size(n, 16) for n in (0, 1, 16, 17, 31, 33, 3000, 4096, 4097)] == [
        16,
        16,
        16,
        18,
        32,
        36,
        3072,
        4096,
        4608,
    ]
    for n in range(64, 70000, 7):
        size = round_up_size(n, 64)
        assert n <= size <= n * 1.125


@pytest.mark.parametrize(
    "lengths", [[5], [1, 1, 1], [0, 7, 0], [40, 3, 17, 17, 9], [64] * 4, [100, 1]]
)
def test_graph_shape_holds_the_batch_and_its_padding(lengths):
    shape = graph_shape(lengths)
    assert shape.tokens >= max(64, sum(lengths)) and shape.max_seqlen >= max(lengths)
    assert shape.slots & (shape.slots - 1) == 0  # a power of two
    ids = torch.arange(sum(lengths)) % VOCAB
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    packed = Packed.from_sequences(ids.split(lengths), [[True] * length for length in lengths])
    padded = packed.padded_to(shape)
    padded_ids, padded_mask = padded.input_ids, padded.pool_mask
    padded_cu, positions = padded.cu_seqlens, padded.position_ids
    assert padded_ids.shape == padded_mask.shape == positions.shape == (shape.tokens,)
    assert padded_cu.shape == (shape.slots + 1,) and padded_cu.dtype == torch.int32
    assert (
        torch.equal(padded_cu[: len(lengths) + 1], cu_seqlens)
        and int(padded_cu[-1]) == shape.tokens
    )
    padded_lengths = torch.diff(padded_cu)
    assert int(padded_lengths.min()) >= 0 and int(padded_lengths.max()) <= shape.max_seqlen
    assert torch.equal(padded_ids[: sum(lengths)], ids) and not padded_mask[sum(lengths) :].any()
    starts = torch.repeat_interleave(padded_cu[:-1].long(), padded_lengths.long())
    assert torch.equal(positions, torch.arange(shape.tokens) - starts)


def test_padding_refuses_a_shape_too_small():
    packed = Packed.from_sequences([[0] * 50, [0] * 50], [[True] * 50, [True] * 50])
    assert packed.cu_seqlens.tolist() == [0, 50, 100]
    shape = graph_shape([50, 50])
    with pytest.raises(ValueError, match="does not fit"):
        packed.padded_to(type(shape)(tokens=64, slots=shape.slots, max_seqlen=shape.max_seqlen))
    with pytest.raises(ValueError, match="do not fit"):
        packed.padded_to(type(shape)(tokens=128, slots=2, max_seqlen=64))


@pytest.mark.parametrize("pooling_mode", POOLING_MODES)
@pytest.mark.parametrize("causal", [False, True])
def test_padding_leaves_the_real_sequences_unchanged(runtime, pooling_mode, causal):
    """The runtime on a padded batch pools the real sequences exactly as on the unpadded one."""
    rng = random.Random(7)
    lengths = [rng.randint(1, 40) for _ in range(6)] + [0, 1]
    ids = torch.tensor([rng.randrange(3, VOCAB) for _ in range(sum(lengths))])
    pool_mask = torch.rand(sum(lengths), generator=torch.Generator().manual_seed(1)) > 0.3
    packed = Packed.from_sequences(ids.split(lengths), pool_mask.split(lengths))
    with torch.no_grad():
        plain = masked_pool(
            runtime(packed, causal=causal), packed.cu_seqlens, pooling_mode, pool_mask, True
        )
        shape = graph_shape(lengths)
        padded_batch = packed.padded_to(shape)
        hidden = runtime(padded_batch, causal=causal)
        padded = masked_pool(
            hidden, padded_batch.cu_seqlens, pooling_mode, padded_batch.pool_mask, True
        )
    assert padded.shape == (shape.slots, runtime.config.hidden_size)
    torch.testing.assert_close(padded[: len(lengths)], plain, atol=1e-6, rtol=1e-6)


def test_graphed_encoder_needs_a_gpu(runtime):
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedEncoder(runtime)


def test_memory_fingerprint_sees_replaced_weights_not_inplace_updates():
    """What decides whether captured graphs (which hold raw pointers) may still be replayed."""
    model = runtime_from_hf(tiny_hf_model("llama", seed=4))
    seen = memory_fingerprint(model)
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight.mul_(2.0)  # in place: a replay reads the new values
    assert memory_fingerprint(model) == seen
    model.layers[1].mlp.down_proj.weight.data = model.layers[1].mlp.down_proj.weight.data.clone()
    assert memory_fingerprint(model) != seen
    seen = memory_fingerprint(model)
    model.to(torch.float64)
    assert memory_fingerprint(model) != seen


def test_cuda_graphs_on_a_cpu_encoder_runs_eagerly(runtime):
    items = [TokenizedText(list(range(3, 3 + n)), [True] * n) for n in (5, 9, 2)]
    eager = LLM2Vec(runtime, tokenizer=None).embed_tokenized(items)
    with pytest.warns(UserWarning, match="CUDA graphs"):
        graphed = LLM2Vec(runtime, tokenizer=None, cuda_graphs=True).embed_tokenized(items)
    torch.testing.assert_close(graphed, eager, atol=0, rtol=0)


def random_items(count: int, seed: int) -> list[TokenizedText]:
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        n = rng.choice([1, 2, rng.randint(3, 30), rng.randint(30, 200)])
        items.append(
            TokenizedText(
                [rng.randrange(3, VOCAB) for _ in range(n)], [rng.random() > 0.2 for _ in range(n)]
            )
        )
    return items


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pooling_mode", ["mean", "last_token"])
def test_gpu_graphs_equal_eager(dtype, pooling_mode):
    model = runtime_from_hf(tiny_hf_model("qwen2", seed=5)).to("cuda", dtype).eval()
    eager = LLM2Vec(model, tokenizer=None, pooling_mode=pooling_mode, max_batch_tokens=512)
    graphed = LLM2Vec(
        model, tokenizer=None, pooling_mode=pooling_mode, max_batch_tokens=512, cuda_graphs=True
    )
    items = random_items(150, seed=11)
    expected = eager.embed_tokenized(items, normalize=True)
    first = graphed.embed_tokenized(items, normalize=True)
    captured = graphed._graphed.num_graphs
    again = graphed.embed_tokenized(items, normalize=True)
    assert (
        captured >= 2 and graphed._graphed.num_graphs == captured
    )  # the second pass replays, captures nothing
    # some batches share a graph
    assert len(list(pack_batches([i.input_ids for i in items], 512))) > captured
    # the same kernels on the real rows; only cuBLAS's choice for the padded row count may differ,
    # by a rounding of the compute dtype per matmul
    if dtype == torch.float32:
        torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
    else:
        assert torch.nn.functional.cosine_similarity(first, expected).min() > 0.9999
    torch.testing.assert_close(again, first, atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_graph_limit_falls_back_to_eager():
    model = runtime_from_hf(tiny_hf_model("llama", seed=6)).to("cuda").eval()
    items = random_items(80, seed=12)
    plans = list(
        pack_batches([i.input_ids for i in items], 256, pool_masks=[i.pool_mask for i in items])
    )
    # so some run eagerly
    assert len({graph_shape(torch.diff(p.cu_seqlens).tolist()) for p in plans}) > 1
    expected = LLM2Vec(model, tokenizer=None, max_length=200, max_batch_tokens=256).embed_tokenized(
        items
    )
    graphed = LLM2Vec(model, tokenizer=None, max_length=200, max_batch_tokens=256, cuda_graphs=True)
    graphed._graphed = GraphedEncoder(model, max_graphs=1)
    torch.testing.assert_close(graphed.embed_tokenized(items), expected, atol=1e-5, rtol=0)
    assert graphed._graphed.num_graphs == 1
    model.train()  # dropout would be frozen into a graph: training batches run eagerly
    assert (
        graphed._graphed.pooled(plans[0], causal=False, pooling_mode="mean", normalize=False)
        is None
    )


@pytest.mark.gpu
def test_gpu_reference_backend_runs_eagerly(monkeypatch):
    """The reference kernels read cu_seqlens on the host, which a capture forbids."""
    model = runtime_from_hf(tiny_hf_model("llama", seed=6)).to("cuda").eval()
    items = random_items(20, seed=13)
    expected = LLM2Vec(model, tokenizer=None).embed_tokenized(items)
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "reference")
    with pytest.raises(ValueError, match="Triton kernels"):
        GraphedEncoder(model)
    with pytest.warns(UserWarning, match="Triton kernels"):
        reference = LLM2Vec(model, tokenizer=None, cuda_graphs=True).embed_tokenized(items)
    torch.testing.assert_close(reference, expected, atol=1e-4, rtol=0)
