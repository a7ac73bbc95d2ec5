"""Training step throughput: one MNTP and one SimCSE step, ours against transformers + peft.

Same model, same LoRA (r=16, alpha=32, dropout 0.05 on q/k/v/o/gate/up/down), same token ids,
same AdamW settings. Ours: the packed runtime with LoRA on its fused projections, ``mntp_loss``
on the masked rows only, SimCSE's two copies in one packed pass. Baseline: a transformers causal
LM with peft's LoRA, sequences padded to the batch's longest, a 4D mask that makes attention
bidirectional over the non-pad tokens (what llm2vec does), full logits for MNTP (llm2vec's
``LlamaBiForMNTP`` computes them all), and mean pooling over the non-pad tokens for SimCSE.

Reported per step: tokens/s (real, non-pad tokens) and peak memory above the level before the
step (CUDA allocator on a GPU; on a CPU the process RSS sampled every millisecond, with glibc
set to return freed tensor memory to the OS so that RSS follows the live tensors).

    python benchmarks/bench_train.py [--quick] [--model PATH] [--batch 8] [--max-len 128]
"""

from __future__ import annotations

import copy
import os
import threading
import time

import harness
import torch
import torch.nn.functional as F

from llm2vec_fast import kernels
from llm2vec_fast.adapters import TARGET_MODULES
from llm2vec_fast.default_model import default_model_path
from llm2vec_fast.loading import load_model
from llm2vec_fast.packed import Packed
from llm2vec_fast.train.lora import add_lora
from llm2vec_fast.train.mntp import IGNORE_INDEX, mask_block, predecessor_rows

LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05}


def extra_args(parser) -> None:
    parser.add_argument(
        "--model", default=None, help="transformers folder (default: the embedded SmolLM2-135M)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="sequences per step (default 8; --quick: 4)"
    )
    parser.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="longest sequence; lengths spread from a quarter of it (default 128; --quick: 64)",
    )


def _release_freed_memory_to_the_os() -> None:
    """Make glibc serve tensors >= 64 KiB with mmap (returned to the OS on free), so that the
    process RSS follows what is live; by default freed blocks stay resident and hide the peak."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_peak_rss(fn) -> int:
    """Peak resident memory during ``fn()`` above the level just before it (sampled each ms)."""
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - before


def peak_memory(fn, device) -> int:
    """Peak memory of one ``fn()`` after a warm-up call (the optimizer state exists by then)."""
    measured = harness.peak_memory_bytes(fn, device=device)
    if measured is not None:
        return measured
    fn()
    return cpu_peak_rss(fn)


def make_sequences(batch: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(max_len // 4, max_len, batch).long().tolist()
    return [torch.randint(10, vocab, (n,), generator=generator).tolist() for n in lengths]


def masked(
    sequences: list[list[int]], mask_id: int, vocab: int
) -> tuple[list[list[int]], list[list[int]]]:
    inputs, labels = [], []
    for i, seq in enumerate(sequences):
        a, b = mask_block(seq, set(), 0.2, False, mask_id, vocab, torch.Generator().manual_seed(i))
        inputs.append(a)
        labels.append(b)
    return inputs, labels


# ---------------------------------------------------------------------------------------- ours


def ours_steps(model, sequences, device, mask_id: int):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    vocab = model.config.vocab_size
    inputs, labels = masked(sequences, mask_id, vocab)
    mntp_batch = Packed.from_sequences(inputs).to(device)
    flat_labels = torch.tensor([t for seq in labels for t in seq], device=device)
    rows, targets = predecessor_rows(flat_labels, mntp_batch.cu_seqlens)
    simcse_batch = Packed.from_sequences(sequences * 2).to(device)

    def mntp() -> None:
        model.set_dropout(attention=0.0, hidden=0.0)
        hidden = model(mntp_batch)
        kernels.mntp_loss(hidden[rows], model.lm_head_weight, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def simcse() -> None:
        model.set_dropout(attention=0.3, hidden=0.0)
        hidden = model(simcse_batch)
        pooled = kernels.masked_pool(hidden, simcse_batch.cu_seqlens, "mean").float()
        first, second = pooled.chunk(2)
        kernels.contrastive_loss(first, second, scale=20.0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return mntp, simcse


# ------------------------------------------------------------------------------ transformers + peft


def padded(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    valid = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        valid[i, : len(seq)] = True
    return ids.to(device), valid.to(device)


def bidirectional_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask: every token sees every non-pad token of its row."""
    blocked = torch.zeros(
        valid.shape[0], 1, valid.shape[1], valid.shape[1], dtype=dtype, device=valid.device
    )
    return blocked.masked_fill(~valid[:, None, None, :], torch.finfo(dtype).min)


def set_hf_attention_dropout(hf_model, p: float) -> None:
    """transformers' attention modules copy ``config.attention_dropout`` when built, so changing the
    config afterwards does nothing: set it on each module."""
    for module in hf_model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p


def hf_steps(hf_model, sequences, device, mask_id: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=list(TARGET_MODULES),
        bias="none",
    )
    model = get_peft_model(hf_model, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    vocab = hf_model.config.vocab_size
    inputs, labels = masked(sequences, mask_id, vocab)
    mntp_ids, mntp_valid = padded(inputs, 0, device)
    label_ids, _ = padded(labels, IGNORE_INDEX, device)
    simcse_ids, simcse_valid = padded(sequences * 2, 0, device)
    dtype = next(hf_model.parameters()).dtype

    def mntp() -> None:
        set_hf_attention_dropout(hf_model, 0.0)
        logits = model(
            input_ids=mntp_ids, attention_mask=bidirectional_mask(mntp_valid, dtype)
        ).logits  # (B, L, V)
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            label_ids[:, 1:].flatten(),
            ignore_index=IGNORE_INDEX,
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def simcse() -> None:
        set_hf_attention_dropout(hf_model, 0.3)
        hidden = model.base_model.model.model(
            input_ids=simcse_ids, attention_mask=bidirectional_mask(simcse_valid, dtype)
        ).last_hidden_state
        weights = simcse_valid[..., None].to(hidden.dtype)
        pooled = ((hidden * weights).sum(1) / weights.sum(1)).float()
        first, second = F.normalize(pooled, dim=-1).chunk(2)
        F.cross_entropy(
            20.0 * first @ second.T, torch.arange(first.shape[0], device=device)
        ).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return mntp, simcse


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0], extra_args)
    device = torch.device(args.device)
    if device.type == "cpu":
        _release_freed_memory_to_the_os()
    dtype = harness.default_dtype(device)
    batch = args.batch or (4 if args.quick else 8)
    max_len = args.max_len or (64 if args.quick else 128)
    repeats = 2 if args.quick else 5
    path = args.model or default_model_path()

    from transformers import AutoModelForCausalLM

    ours, tokenizer = load_model(path, dtype=dtype, device=device)
    torch.manual_seed(0)
    add_lora(ours, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"]).train()
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="sdpa"
    ).to(device)
    sequences = make_sequences(batch, max_len, ours.config.vocab_size)
    mask_id = tokenizer.convert_tokens_to_ids("_")
    real_tokens = sum(len(s) for s in sequences)

    ours_mntp, ours_simcse = ours_steps(ours, sequences, device, mask_id)
    hf_mntp, hf_simcse = hf_steps(copy.deepcopy(hf_model), sequences, device, mask_id)
    del hf_model
    results = harness.Results("train", device, args.out)
    for name, ours_fn, hf_fn, tokens in (
        ("mntp", ours_mntp, hf_mntp, real_tokens),
        ("simcse", ours_simcse, hf_simcse, 2 * real_tokens),
    ):
        config = {
            "step": name,
            "model": os.path.basename(str(path)),
            "batch": batch,
            "max_len": max_len,
            "dtype": str(dtype).removeprefix("torch."),
        }
        our_peak = peak_memory(ours_fn, device)
        hf_peak = peak_memory(hf_fn, device)
        our_ms = harness.measure_ms(ours_fn, device=device, warmup=1, repeats=repeats)
        hf_ms = harness.measure_ms(hf_fn, device=device, warmup=1, repeats=repeats)
        results.add(
            config,
            "tokens/s",
            tokens / our_ms * 1e3,
            baseline_name="transformers+peft",
            baseline=tokens / hf_ms * 1e3,
            step_ms=our_ms,
            baseline_step_ms=hf_ms,
        )
        results.add(
            config,
            "peak MiB",
            our_peak / 2**20,
            baseline_name="transformers+peft",
            baseline=hf_peak / 2**20,
            higher_is_better=False,
        )
    results.save()


if __name__ == "__main__":
    main()
