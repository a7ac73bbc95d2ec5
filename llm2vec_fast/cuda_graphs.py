"""CUDA graphs for encoding: replay the runtime's forward pass and pooling with one launch.

A small model on a GPU spends much of each batch launching kernels and running Python (about ten
launches per layer); a captured CUDA graph replays all of them at once. A graph fixes every shape
and launch grid, so a packed batch is padded up to a *graph shape*:

- tokens and ``max_seqlen`` rounded up to a size with three bits after the leading one (at most
  12.5% more), sequence slots up to a power of two;
- the padding tokens (id 0) fill extra sequences of at most ``max_seqlen`` tokens after the real
  ones, and the slots left over are empty sequences.

Attention never crosses sequences, so the real sequences go through the same computation as in
the unpadded batch (cuBLAS may pick another algorithm for the padded row count, a rounding-level
difference); the price is the matmul work on at most 12.5% extra tokens. Whether that pays
depends on the model size and the card: ``benchmarks/bench_encode.py`` measures it (graphs are
off by default).

All graphs share one memory pool. That is safe because every copy in, replay and copy out runs
under one lock on one stream of the encoder's own, so the next replay cannot start before the
last one's output was copied.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .kernels import masked_pool
from .kernels._dispatch import interpreting, use_triton
from .kernels.attention import MAX_SEQUENCES
from .model import DecoderModel
from .varlen import varlen_metadata

DEFAULT_MAX_GRAPHS = 64


def round_up_size(n: int, minimum: int) -> int:
    """The smallest ``m * 2**e >= max(n, minimum)`` with ``m < 16``: at most 12.5% above n."""
    n = max(n, minimum)
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


@dataclass(frozen=True)
class GraphShape:
    """The static shape a batch is padded to: ``tokens`` T, ``slots`` B and ``max_seqlen``."""

    tokens: int
    slots: int
    max_seqlen: int


def padding_lengths(padding: int, max_seqlen: int) -> list[int]:
    """Lengths of the padding sequences holding ``padding`` tokens, none over ``max_seqlen``."""
    return [max_seqlen] * (padding // max_seqlen) + (
        [padding % max_seqlen] if padding % max_seqlen else []
    )


def graph_shape(lengths: list[int]) -> GraphShape:
    """The graph shape for a packed batch whose sequences have these token counts."""
    max_seqlen = round_up_size(max(lengths, default=0), 16)
    tokens = round_up_size(sum(lengths), 64)
    sequences = len(lengths) + len(padding_lengths(tokens - sum(lengths), max_seqlen))
    slots = 1 << max(0, sequences - 1).bit_length()
    return GraphShape(tokens, slots, max_seqlen)


def pad_batch(
    input_ids: torch.Tensor, pool_mask: torch.Tensor, cu_seqlens: torch.Tensor, shape: GraphShape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed batch (CPU tensors) padded to ``shape``: input_ids int64 ``(T',)``, pool_mask bool
    ``(T',)``, cu_seqlens int32 ``(B' + 1,)`` and position_ids int64 ``(T',)``.

    The first B sequences are the given ones, unchanged; padding tokens are never pooled.
    """
    total = input_ids.shape[0]
    padding = shape.tokens - total
    if padding < 0:
        raise ValueError(f"a batch of {total} tokens does not fit {shape}")
    lengths = torch.diff(cu_seqlens.long())  # (B,)
    padding_sequences = torch.tensor(
        padding_lengths(padding, shape.max_seqlen), dtype=torch.long
    )  # (P,)
    all_lengths = torch.cat([lengths, padding_sequences])  # (B + P,)
    if all_lengths.numel() > shape.slots:
        raise ValueError(f"{all_lengths.numel()} sequences with the padding do not fit {shape}")
    padded_cu = torch.zeros(shape.slots + 1, dtype=torch.int32)
    padded_cu[1 : all_lengths.numel() + 1] = torch.cumsum(all_lengths, 0).to(torch.int32)
    padded_cu[all_lengths.numel() + 1 :] = shape.tokens
    _, position_ids = varlen_metadata(
        padded_cu, shape.tokens
    )  # (T',) restarting at 0 in each sequence
    padded_ids = torch.cat([input_ids.long(), input_ids.new_zeros(padding, dtype=torch.long)])
    padded_mask = torch.cat([pool_mask.bool(), torch.zeros(padding, dtype=torch.bool)])
    return padded_ids, padded_mask, padded_cu, position_ids.long()


@dataclass
class _CapturedGraph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[
        torch.Tensor, ...
    ]  # static (input_ids, pool_mask, cu_seqlens, position_ids) on the device
    pooled: torch.Tensor  # static output (slots, hidden)


class GraphedEncoder:
    """Forward pass + pooling of one ``DecoderModel`` on one CUDA device, replayed from graphs.

    One graph per (shape, causal, pooling, normalize), captured on first use; after
    ``max_graphs`` captures, batches of a new shape get ``None`` and the caller runs them eagerly.
    Callers may share it across threads: a lock serializes the batches, and captures use
    thread-local capture mode so that another thread's CUDA work does not break them.
    """

    def __init__(self, model: DecoderModel, max_graphs: int = DEFAULT_MAX_GRAPHS):
        device = model.embed_tokens.weight.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}")
        if not use_triton(model.embed_tokens.weight) or interpreting():
            raise ValueError(
                "CUDA graphs need the Triton kernels (the reference backend reads cu_seqlens on the host)"
            )
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.model = model
        self.device = device
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _CapturedGraph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(
            device
        )  # every copy, warm-up, capture and replay runs here
        self._lock = threading.Lock()
        model.inv_freq_on(
            device
        )  # moved now, not during the first forward, so the fingerprint holds
        self._memory_seen = memory_fingerprint(model)

    def still_valid(self, model: DecoderModel) -> bool:
        """False once the graphs may read stale memory: another model, or any of its weights
        replaced by a new tensor (``model.to(...)``, ``.data = ...``); in-place updates are seen."""
        return model is self.model and memory_fingerprint(model) == self._memory_seen

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def pooled(
        self,
        input_ids: torch.Tensor,
        pool_mask: torch.Tensor,
        cu_seqlens: torch.Tensor,
        *,
        causal: bool,
        mode: str,
        normalize: bool,
    ) -> torch.Tensor | None:
        """Pooled ``(B, hidden)`` on the device for one packed batch given as CPU tensors (B + 1
        cu_seqlens, already checked), or None when it must run eagerly: the model is in train
        mode, the graph limit is reached, or the padded batch has too many sequence slots."""
        if self.model.training:
            return None
        lengths = torch.diff(cu_seqlens).tolist()
        shape = graph_shape(lengths)
        key = (shape, bool(causal), mode, bool(normalize))
        if shape.slots > MAX_SEQUENCES or (
            key not in self._graphs and len(self._graphs) >= self.max_graphs
        ):
            return None
        padded = [t.pin_memory() for t in pad_batch(input_ids, pool_mask, cu_seqlens, shape)]
        with self._lock, torch.cuda.device(self.device), torch.inference_mode():
            current = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(current)  # the caller's earlier work on this batch's inputs
            with torch.cuda.stream(self._stream):
                captured = self._graphs.get(key)
                if captured is None:
                    if len(self._graphs) >= self.max_graphs:  # another thread took the last slot
                        return None
                    static = [t.to(self.device, non_blocking=True) for t in padded]
                    captured = self._capture(static, shape, causal, mode, normalize)
                    self._graphs[key] = captured
                else:
                    for static, value in zip(captured.inputs, padded):
                        static.copy_(value, non_blocking=True)
                captured.graph.replay()
                # a copy: the pool is shared, so the next replay of any graph may overwrite the output
                result = captured.pooled[: len(lengths)].clone()
            current.wait_stream(self._stream)
            result.record_stream(current)  # made on our stream, used and freed on the caller's
            return result

    def _capture(
        self,
        inputs: list[torch.Tensor],
        shape: GraphShape,
        causal: bool,
        mode: str,
        normalize: bool,
    ) -> _CapturedGraph:
        """Warm up (Triton compiles, cuBLAS picks kernels), then capture, both on the encoder's
        stream; the static inputs already hold the batch that asked for this graph."""
        input_ids, pool_mask, cu_seqlens, position_ids = inputs

        def run() -> torch.Tensor:
            hidden = self.model.forward_unchecked(
                input_ids, cu_seqlens, shape.max_seqlen, position_ids, causal=causal
            )
            return masked_pool(
                hidden, cu_seqlens, mode, pool_mask, normalize, check_cu_seqlens=False
            )  # (B', hidden)

        run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(
            graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"
        ):
            pooled = run()
        return _CapturedGraph(graph, tuple(inputs), pooled)


def memory_fingerprint(model: DecoderModel) -> tuple:
    """Where every tensor a graph reads lives: the parameters and the RoPE frequencies."""
    parameters = tuple((p.data_ptr(), p.dtype, p.shape) for p in model.parameters())
    return parameters + (model._inv_freq.data_ptr(),)
