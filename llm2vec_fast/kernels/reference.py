"""Plain-PyTorch definitions of every op in ``llm2vec_fast.kernels``.

These functions are both the CPU execution path and the oracle the Triton kernels are tested
against. They compute in the input dtype where PyTorch already accumulates in fp32 (matmuls,
``scaled_dot_product_attention``) and upcast to fp32 where it does not (norms, softmax, losses),
so the CPU runtime stays fast in bf16. Tests obtain a high-precision oracle by calling them on
fp32 or fp64 copies of the inputs.

Varlen convention: packed ``(T, ...)`` tensors, ``cu_seqlens`` int32 ``(B + 1,)`` starting at 0,
``position_ids`` restarting at 0 for each sequence; empty sequences are legal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    window: int | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention within each packed sequence, never across sequences.

    q ``(T, Hq, D)``, k/v ``(T, Hkv, D)`` with ``Hq % Hkv == 0`` (GQA); returns ``(T, Hq, D)``.
    ``window``: query i sees key j only when ``|i - j| < window`` (and ``j <= i`` if causal), as
    ``kernels.attention.varlen_attention`` documents. Dropout on the attention probabilities uses
    PyTorch's global RNG.
    """
    del max_seqlen  # the reference walks the sequences one by one
    total, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"query heads ({num_q_heads}) must be a multiple of key/value heads ({num_kv_heads})"
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # (H, L, D) per sequence
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].transpose(0, 1)
        vs = v[start:end].transpose(0, 1)
        mask = None
        if window is not None:
            positions = torch.arange(end - start, device=q.device)
            distance = positions[:, None] - positions[None, :]  # (L, L) query - key
            mask = (distance < window) & (distance > -window)
            if causal:
                mask &= distance >= 0
        os_ = F.scaled_dot_product_attention(
            qs.unsqueeze(0),
            ks.unsqueeze(0),
            vs.unsqueeze(0),
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=causal and mask is None,
            scale=scale,
            enable_gqa=num_q_heads != num_kv_heads,
        )
        out[start:end] = os_[0].transpose(0, 1)
    return out


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the sequence each packed token belongs to: ``(T,)`` int64."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=total
    )


def masked_pool(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pooling_mode: str,
    pool_mask: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Pool the token states of each packed sequence into one vector.

    hidden ``(T, H)``; ``pool_mask`` ``(T,)`` bool marks the tokens that ``mean`` and
    ``weighted_mean`` pool (all tokens when ``None``). ``weighted_mean`` weighs the pooled tokens
    1..L in order. ``eos_token``/``last_token`` take each sequence's last token, ``bos_token`` its
    first, whatever the mask. Sequences with nothing to pool give zeros. Returns ``(B, H)`` in the
    dtype of ``hidden``, computed in fp32.
    """
    if pooling_mode not in POOLING_MODES:
        raise ValueError(
            f"unknown pooling mode {pooling_mode!r}; expected one of {', '.join(POOLING_MODES)}"
        )
    total, width = hidden.shape
    batch = cu_seqlens.numel() - 1
    starts = cu_seqlens[:-1].long()
    ends = cu_seqlens[1:].long()
    compute = _compute_dtype(hidden.dtype)
    hidden32 = hidden.to(compute)
    if pooling_mode in ("eos_token", "last_token", "bos_token"):
        index = (ends - 1) if pooling_mode != "bos_token" else starts
        nonempty = ends > starts
        picked = (
            hidden32[index.clamp(0, max(total - 1, 0))]
            if total
            else hidden32.new_zeros(batch, width)
        )
        pooled = torch.where(nonempty[:, None], picked, torch.zeros_like(picked))
    else:
        seq = sequence_ids(cu_seqlens, total)
        mask = (
            torch.ones(total, dtype=torch.bool, device=hidden.device)
            if pool_mask is None
            else pool_mask.bool()
        )
        weights = mask.to(compute)
        if pooling_mode == "weighted_mean":
            # rank of each pooled token inside its sequence: 1, 2, ... L
            running = torch.cumsum(weights, 0)
            offset = torch.cat([running.new_zeros(1), running])[
                starts
            ]  # pooled tokens before each sequence
            weights = (running - offset[seq]) * weights
        totals = torch.zeros(batch, device=hidden.device, dtype=compute).index_add_(0, seq, weights)
        sums = torch.zeros(batch, width, device=hidden.device, dtype=compute).index_add_(
            0, seq, hidden32 * weights[:, None]
        )
        pooled = sums / totals.clamp_min(1e-9)[:, None]
    if normalize:
        pooled = F.normalize(pooled, p=2.0, dim=-1, eps=1e-12)
    return pooled.to(hidden.dtype)


def contrastive_loss(
    queries: torch.Tensor,
    docs: torch.Tensor,
    *,
    scale: float = 20.0,
    symmetric: bool = False,
) -> torch.Tensor:
    """In-batch InfoNCE over cosine similarities.

    queries ``(B, D)``, docs ``(N, D)`` with ``N >= B``: doc ``i`` is the positive of query ``i``
    and rows ``B..N-1`` are extra (hard) negatives for every query. Returns a scalar fp32 loss
    (fp64 for fp64 inputs); ``symmetric`` averages it with the docs-to-queries direction over the
    ``B`` positives.
    """
    batch = queries.shape[0]
    if docs.shape[0] < batch:
        raise ValueError(f"need at least one doc per query: {batch} queries, {docs.shape[0]} docs")
    q = F.normalize(queries.to(_compute_dtype(queries.dtype)), dim=-1)
    d = F.normalize(docs.to(_compute_dtype(docs.dtype)), dim=-1)
    targets = torch.arange(batch, device=queries.device)
    loss = F.cross_entropy(scale * q @ d.T, targets)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(scale * d[:batch] @ q.T, targets))
    return loss


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit inputs; fp64 inputs stay fp64 so tests can build an fp64 oracle."""
    return torch.promote_types(dtype, torch.float32)


def mntp_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, in fp32 (fp64 for
    fp64 inputs).

    hidden ``(N, H)``, weight ``(V, H)``, labels ``(N,)``; rows labelled ``ignore_index`` do not
    count. With no counted row the loss is 0 (not NaN), so an unlucky batch cannot poison training.
    """
    keep = labels != ignore_index
    if not bool(keep.any()):
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        if bias is not None:
            zero = zero + bias.sum() * 0.0
        return zero.to(_compute_dtype(hidden.dtype))
    logits = F.linear(hidden[keep], weight, bias)
    return F.cross_entropy(logits.to(_compute_dtype(logits.dtype)), labels[keep])


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    unit_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x + residual`` (Llama's form: fp32 statistics, scale by ``weight`` last;
    ``unit_offset``, Gemma's: scale by ``1 + weight`` in fp32, rounded once).

    x, residual ``(T, H)``; returns ``(normed, x + residual)`` so the caller keeps the residual
    stream. Without a residual the second output is ``x`` itself.
    """
    summed = x if residual is None else x + residual
    compute = _compute_dtype(summed.dtype)
    h32 = summed.to(compute)
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        return (normed * (1.0 + weight.to(compute))).to(out_dtype), summed
    return weight * normed.to(x.dtype), summed


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0
):
    """cos and sin tables ``(T, D)`` for packed ``position_ids`` ``(T,)`` (HF's rotate-half layout).

    The angles are fp32 products ``position * inv_freq`` as in Hugging Face; cos and sin are taken
    in fp32, or in fp64 when ``inv_freq`` is fp64 (the tests' oracle).
    """
    freqs = position_ids.float()[:, None] * inv_freq.float()[None, :]  # (T, D/2)
    angles = torch.cat([freqs, freqs], dim=-1).to(_compute_dtype(inv_freq.dtype))  # (T, D)
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding on packed q ``(T, Hq, D)`` and k ``(T, Hkv, D)``."""
    cos, sin = rotary_cos_sin(position_ids, inv_freq, attention_scaling)
    cos = cos[:, None, :]
    sin = sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(cos.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
        return (x32 * cos + rotated * sin).to(x.dtype)

    return rotate(q), rotate(k)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where gate_up ``(T, 2I)`` holds gate in its first half: returns
    ``(T, I)``."""
    gate, up = gate_up.chunk(2, dim=-1)
    compute = _compute_dtype(gate_up.dtype)
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate_up.dtype)
