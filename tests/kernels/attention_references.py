"""The attention tests' own references (plain PyTorch, any dtype), shared by the CPU and GPU tiers."""

import torch


def reference_attention(q, k, v, causal, scale):
    """Plain matmul-softmax in q's dtype, per (batch, head); the test's own reference."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        L = q.shape[1]
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def reference_prefix_attention(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index, scale):
    """Sequences grouped by their exact length n (no padding, no packing tricks): each attends to
    [its prefix's P keys; its own n suffix keys], causal on the suffix."""
    P = prefix_k.shape[1]
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    groups = torch.zeros_like(starts) if prefix_index is None else prefix_index.long()
    out = torch.zeros_like(q)
    for n in lengths.unique().tolist():
        seqs = (lengths == n).nonzero().squeeze(1)
        tokens = starts[seqs, None] + torch.arange(n, device=q.device)  # [m, n]
        keys = torch.cat([prefix_k[groups[seqs]], k[tokens]], 1)  # [m, P + n, H, D]
        values = torch.cat([prefix_v[groups[seqs]], v[tokens]], 1)
        scores = torch.einsum("mqhd,mkhd->mhqk", q[tokens], keys) * scale
        allowed = torch.ones(n, P + n, dtype=torch.bool, device=q.device)
        allowed[:, P:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = out.index_put((tokens,), torch.einsum("mhqk,mkhd->mqhd", scores.softmax(-1), values))
    return out
