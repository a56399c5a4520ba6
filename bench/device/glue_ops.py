"""The two glue fusions of 2026-11-28 against the op sequences they replace, forward + backward, at the ImageNet
step's shapes (GPU, bf16):

* text: one block's attention over the packed stream of MaPLe's C = 1000 ImageNet prompts (8 heads of 64) as one
  op (`prefix_stream_attention`, Triton) against the former sequence: split of the in-projection, the prefixes'
  causal attention (auto's dense backend), `prefix_varlen_attention` (Triton) and a cat of the outputs (whose
  backward adds the prefix keys' two gradients and stacks dq, dk, dv);
* vision: a deep-prompt splice entering a block, B = 32, L = 199, d = 768, MaPLe's 2 shared prompt tokens, as one
  LayerNorm kernel (`layer_norm_spliced`) against add + split + cat + the fused residual LayerNorm.

Each case is timed plain (wall time per call: what a step without a CUDA graph pays, host included) and as a CUDA
graph replay (GPU time). From the repo root:

    python bench/device/glue_ops.py            # on the GPU machine; one JSON line per case
    python bench/device/glue_ops.py --smoke    # tiny shapes on CPU under TRITON_INTERPRET=1 (the CI check)
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from bench.device.timing import conditions, graphed_ms_per_call, ms_per_call  # noqa: E402


def _text_case(device, dtype, smoke: bool):
    from bench.workloads import WORKLOADS
    from fastprompt.ops.attention import attention, prefix_stream_attention, prefix_varlen_attention

    if smoke:
        lengths, prefix_len, heads = [3, 1, 4, 2, 5], 3, 2
    else:
        import open_clip

        tokenizer = open_clip.get_tokenizer("ViT-B-16")
        names = WORKLOADS["imagenet-b32"].classnames()
        tokens = tokenizer([f"X X {name}." for name in names])  # MaPLe: SOS + 2 context slots, then the suffix
        eot = tokens.argmax(-1)
        prefix_len, heads = 3, 8
        lengths = (eot + 1 - prefix_len).tolist()
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    cu, max_len = cu.to(device), max(lengths)
    rows = prefix_len + int(cu[-1])
    qkv = torch.randn(rows, 3, heads, 64, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(rows, heads, 64, device=device, dtype=dtype)

    def fused():
        out = prefix_stream_attention(qkv, cu, max_len, 1, prefix_len, backend="triton")
        out.backward(grad)

    def composed():  # what PackedText._block ran before
        prefix, suffix = qkv.split([prefix_len, rows - prefix_len])
        qp, kp, vp = (t.unflatten(0, (1, prefix_len)) for t in prefix.unbind(1))
        q, k, v = suffix.unbind(1)
        out_prefix = attention(qp, kp, vp, causal=True)
        out_suffix = prefix_varlen_attention(q, k, v, cu, max_len, kp, vp, None, backend="triton")
        torch.cat([out_prefix.flatten(0, 1), out_suffix]).backward(grad)

    return {"case": "text_stream_attention", "rows": rows, "sequences": len(lengths), "heads": heads}, fused, composed


def _vision_case(device, dtype, smoke: bool):
    from fastprompt.ops.layer_norm import layer_norm, layer_norm_spliced

    batch, length, width, n, start = (2, 9, 64, 2, 1) if smoke else (32, 199, 768, 2, 1)
    x = torch.randn(batch, length, width, device=device, dtype=dtype, requires_grad=True)
    pending = torch.randn_like(x, requires_grad=True)
    prompts = torch.randn(n, width, device=device, dtype=dtype, requires_grad=True)
    weight, bias = torch.ones(width, device=device), torch.zeros(width, device=device)
    dy, d_sum = torch.randn_like(x), torch.randn_like(x)

    def fused():
        y, s = layer_norm_spliced(pending, x, prompts.unsqueeze(0).expand(batch, -1, -1), weight, bias, 1e-5,
                                  length, start)
        torch.autograd.backward([y, s], [dy, d_sum])

    def composed():  # what encode_image ran before: the sum finished, a split and a cat, then LN1
        s = x + pending
        keep, _, rest = s.split([start, n, length - start - n], dim=1)
        s = torch.cat([keep, prompts.unsqueeze(0).expand(batch, -1, -1), rest], dim=1)
        y = layer_norm(s, weight, bias, 1e-5)
        torch.autograd.backward([y, s], [dy, d_sum])  # s also feeds the residual stream: its gradients add

    return {"case": "vision_splice_layer_norm", "shape": [batch, length, width], "prompts": n}, fused, composed


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    smoke = "--smoke" in argv
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype, n = torch.device("cpu"), torch.float32, 1
    else:
        device, dtype, n = torch.device("cuda"), torch.bfloat16, 50
    for make in (_text_case, _vision_case):
        record, fused, composed = make(device, dtype, smoke)
        for label, fn in (("fused", fused), ("composed", composed)):
            record[f"{label}_ms_plain"] = round(ms_per_call(fn, device, n), 4)
            graphed = graphed_ms_per_call(fn, device, n)
            record[f"{label}_ms_graphed"] = None if graphed is None else round(graphed, 4)
        record.update(conditions(device, dtype))
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
