"""gathered_contrastive_loss on 2 gloo processes equals the single-process loss on the
concatenated batch: the loss averaged over ranks, and the gradients after DDP-style all-reduce
averaging (a shared projection ``W``) and per input (each rank's input gradient is ``world``
times the single-process one, since DDP divides by ``world`` afterwards)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from llm2vec_fast.kernels import contrastive_loss, reference
from llm2vec_fast.train.distributed import (
    DistContext,
    contrastive_loss_over_ranks,
    gathered_contrastive_loss,
)

WORLD = 2
BATCH, WIDTH, PROJECTED = 5, 12, 24

# (backend, hard negatives per rank, symmetric)
CONFIGS = [
    ("reference", 0, False),
    ("reference", 3, True),
    ("triton", 0, True),
    ("triton", 3, False),
]


def _inputs(negatives: int, seed: int):
    """The concatenated batch: per-rank queries / docs inputs ``(R, B or N, WIDTH)`` and ``W``."""
    generator = torch.Generator().manual_seed(seed)
    x_queries = torch.randn(WORLD, BATCH, WIDTH, generator=generator, dtype=torch.float64)
    x_docs = torch.randn(WORLD, BATCH + negatives, WIDTH, generator=generator, dtype=torch.float64)
    x_docs[:, :BATCH] += x_queries
    weight = torch.randn(WIDTH, PROJECTED, generator=generator, dtype=torch.float64)
    return x_queries, x_docs, weight


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        context = DistContext(rank=rank, world=WORLD)
        results = []
        for i, (backend, negatives, symmetric) in enumerate(CONFIGS):
            os.environ["LLM2VEC_FAST_BACKEND"] = backend
            x_queries, x_docs, weight = _inputs(negatives, seed=i)
            x_q = x_queries[rank].float().requires_grad_()
            x_d = x_docs[rank].float().requires_grad_()
            w = weight.float().requires_grad_()
            loss = gathered_contrastive_loss(
                x_q @ w, x_d @ w, scale=20.0, symmetric=symmetric, context=context
            )
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            dist.all_reduce(w.grad)
            results.append((mean_loss / WORLD, w.grad / WORLD, x_q.grad, x_d.grad))
        os.environ["LLM2VEC_FAST_BACKEND"] = "reference"
        uneven = torch.randn(BATCH + rank, PROJECTED)
        try:
            gathered_contrastive_loss(uneven, uneven, scale=20.0, symmetric=False, context=context)
            results.append("no error")
        except ValueError as error:
            results.append(str(error))
        *cases, message = results  # written as safetensors + text: the project never reads pickles
        tensors = {
            f"{i}.{j}": t.contiguous() for i, case in enumerate(cases) for j, t in enumerate(case)
        }
        save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as handle:
            handle.write(message)
    finally:
        dist.destroy_process_group()


def _single_process(negatives: int, symmetric: bool, seed: int):
    """Loss and gradients on the concatenated batch: [all queries], [all positives, all
    negatives]."""
    x_queries, x_docs, weight = _inputs(negatives, seed)
    x_q = x_queries.clone().requires_grad_()
    x_d = x_docs.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    queries = x_q.reshape(-1, WIDTH) @ w
    docs = torch.cat([x_d[:, :BATCH].reshape(-1, WIDTH), x_d[:, BATCH:].reshape(-1, WIDTH)]) @ w
    loss = reference.contrastive_loss(queries, docs, symmetric=symmetric)
    loss.backward()
    return loss.detach(), w.grad, x_q.grad, x_d.grad


def test_gathered_loss_equals_single_process_loss(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = []
    for r in range(WORLD):
        tensors = load_file(str(tmp_path / f"rank{r}.safetensors"))
        cases = [tuple(tensors[f"{i}.{j}"] for j in range(4)) for i in range(len(CONFIGS))]
        per_rank.append([*cases, (tmp_path / f"rank{r}.txt").read_text()])
    for i, (backend, negatives, symmetric) in enumerate(CONFIGS):
        loss, grad_w, grad_x_q, grad_x_d = _single_process(negatives, symmetric, seed=i)
        for rank, results in enumerate(per_rank):
            got_loss, got_grad_w, got_x_q, got_x_d = results[i]
            what = f"{backend}, {negatives} negatives, symmetric={symmetric}, rank {rank}"
            # fp32 computation against the fp64 single-process result
            torch.testing.assert_close(got_loss.double(), loss, rtol=1e-5, atol=1e-6, msg=what)
            torch.testing.assert_close(got_grad_w.double(), grad_w, rtol=1e-4, atol=1e-6, msg=what)
            torch.testing.assert_close(
                got_x_q.double() / WORLD, grad_x_q[rank], rtol=1e-4, atol=1e-6, msg=what
            )
            torch.testing.assert_close(
                got_x_d.double() / WORLD, grad_x_d[rank], rtol=1e-4, atol=1e-6, msg=what
            )
    for results in per_rank:
        assert "equal batch sizes" in results[-1]


@pytest.mark.parametrize("negatives", [0, 2])
def test_single_rank_group_is_the_plain_loss(tmp_path, negatives):
    """With world size 1 the gathered loss is the plain loss (the layout is the identity)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        generator = torch.Generator().manual_seed(negatives)
        queries, docs = (
            torch.randn(4, 8, generator=generator),
            torch.randn(4 + negatives, 8, generator=generator),
        )
        gathered = contrastive_loss_over_ranks(queries, docs, scale=20.0, symmetric=True)
        torch.testing.assert_close(gathered, contrastive_loss(queries, docs, symmetric=True))
    finally:
        dist.destroy_process_group()


def test_loss_over_ranks_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        contrastive_loss_over_ranks(
            torch.randn(2, 8), torch.randn(2, 8), scale=20.0, symmetric=False
        )


def test_single_process_context_is_the_plain_loss():
    """Without torchrun (world size 1) nothing is gathered and no process group is needed."""
    generator = torch.Generator().manual_seed(0)
    queries, docs = torch.randn(3, 8, generator=generator), torch.randn(5, 8, generator=generator)
    loss = gathered_contrastive_loss(
        queries, docs, scale=20.0, symmetric=True, context=DistContext()
    )
    torch.testing.assert_close(loss, contrastive_loss(queries, docs, symmetric=True))
