"""CUDA graphs for encoding: replay the runtime's forward pass and pooling with one launch.

A small model on a GPU spends much of each batch launching kernels and running Python (about ten
launches per layer); a captured CUDA graph replays all of them at once. A graph fixes every shape
and launch grid, so a packed batch is padded up to a *graph shape* (``Packed.padded_to``):

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

from .kernels import interpreting, use_triton
from .model import DecoderModel, forward_and_pool
from .packed import Packed, graph_shape

DEFAULT_MAX_GRAPHS = 64


@dataclass
class _CapturedGraph:
    graph: torch.cuda.CUDAGraph
    inputs: Packed  # the static inputs on the device
    pooled: torch.Tensor  # static output (slots, hidden)


class GraphedEncoder:
    """Forward pass + pooling of one ``DecoderModel`` on one CUDA device, replayed from graphs.

    One graph per (shape, causal, pooling_mode, normalize), captured on first use; after
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
                "CUDA graphs need the Triton kernels (the reference backend reads cu_seqlens on"
                " the host)"
            )
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.model = model
        self.device = device
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _CapturedGraph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        # every copy, warm-up, capture and replay runs on this stream
        self._stream = torch.cuda.Stream(device)
        self._lock = threading.Lock()
        # moved now, not during the first forward, so that the fingerprint holds
        model.inv_freq_on(device)
        self._memory_seen = memory_fingerprint(model)

    def still_valid(self, model: DecoderModel) -> bool:
        """False once the graphs may read stale memory: another model, or any of its weights
        replaced by a new tensor (``model.to(...)``, ``.data = ...``); in-place updates are seen."""
        return model is self.model and memory_fingerprint(model) == self._memory_seen

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def pooled(
        self, packed: Packed, *, causal: bool, pooling_mode: str, normalize: bool
    ) -> torch.Tensor | None:
        """Pooled ``(B, hidden)`` on the device for one packed batch on the host (checked), or
        None when it must run eagerly: the model is in train mode or the graph limit is
        reached."""
        if self.model.training:
            return None
        shape = graph_shape(torch.diff(packed.cu_seqlens).tolist())
        key = (shape, bool(causal), pooling_mode, bool(normalize))
        if key not in self._graphs and len(self._graphs) >= self.max_graphs:
            return None
        padded = packed.padded_to(shape).pinned()
        with self._lock, torch.cuda.device(self.device), torch.inference_mode():
            current = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(current)  # the caller's earlier work on this batch's inputs
            with torch.cuda.stream(self._stream):
                captured = self._graphs.get(key)
                if captured is None:
                    if len(self._graphs) >= self.max_graphs:  # another thread took the last slot
                        return None
                    static = padded.to(self.device)
                    captured = self._capture(static, causal, pooling_mode, normalize)
                    self._graphs[key] = captured
                else:
                    captured.inputs.copy_from(padded)
                captured.graph.replay()
                # a copy: the pool is shared, so the next replay of any graph may overwrite it
                result = captured.pooled[: packed.batch_size].clone()
            current.wait_stream(self._stream)
            result.record_stream(current)  # made on our stream, used and freed on the caller's
            return result

    def _capture(
        self, inputs: Packed, causal: bool, pooling_mode: str, normalize: bool
    ) -> _CapturedGraph:
        """Warm up (Triton compiles, cuBLAS picks kernels), then capture, both on the encoder's
        stream; the static inputs already hold the batch that asked for this graph."""

        def run() -> torch.Tensor:
            return forward_and_pool(
                self.model.forward_unchecked,
                inputs,
                pooling_mode,
                causal=causal,
                normalize=normalize,
            )  # (slots, hidden)

        run()
        # the warm-up's attention work lists would be frozen into the graph: it builds its own
        inputs.attention_schedules.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(
            graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"
        ):
            pooled = run()
        return _CapturedGraph(graph, inputs, pooled)


def memory_fingerprint(model: DecoderModel) -> tuple:
    """Where every tensor a graph reads lives: the parameters and the RoPE frequencies."""
    parameters = tuple((p.data_ptr(), p.dtype, p.shape) for p in model.parameters())
    return parameters + (model.rope_inv_freq.data_ptr(),)
