"""MCPL's VAIPL decoder alone at the ImageNet step's shapes: how much of MCPL's step it takes and where its GPU time
goes (GPU, bf16 autocast as the benchmark trains).

The decoder is method code (fastprompt/methods/mcpl/vaipl.py), the same for every contender, and bench/flops.py counts
it at 1.92 TFLOP of MCPL's 4.83 per fastprompt step at C = 1000, B = 32 (40 %), while the H200 run of e536e88 timed
that step at 25.5 ms (1,253 img/s, 4.6x eager, the furthest of the eight methods from issue 9's 8x). This times one
forward + backward of the decoder as the step runs it (`prepare` of the class queries, then both layers over every
image's tokens; fp32 parameters under bf16 autocast), plain (host included) and as a CUDA graph replay (the GPU time),
with its FLOPs from the step's own geometry, and writes the profiler's kernel table of three plain calls to
$OUT/decoder_profile.txt. From the repo root:

    python bench/device/decoder.py            # on the GPU machine: one JSON line
    python bench/device/decoder.py --smoke    # tiny shapes on CPU, fp32 (the CI check that it still runs)
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.getcwd())
from bench.device.timing import conditions, graphed_ms_per_call, ms_per_call  # noqa: E402


def _decoder_and_flops(smoke: bool, batch: int):
    """The MCPL model's own decoder (its constructor arguments as `fastprompt.build` gives them), initialised, and the
    step geometry's FLOPs for its forward + backward at `batch`."""
    from bench.contenders import contender_options
    from bench.flops import train_step_flops
    from bench.workloads import WORKLOADS
    from fastprompt.memory import structural_model

    workload = WORKLOADS["imagenet-b32"]
    names = workload.classnames()[:4] if smoke else workload.classnames()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ImageNet's duplicate class names
        model = structural_model("mcpl", names, "tiny" if smoke else workload.backbone)
    flops = train_step_flops(model, batch, contender_options("fastprompt")).by_pass["vaipl decoder"]
    decoder = model.method.decoder
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # structural_model leaves weights uninitialised
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    image_tokens = model.method.vision_schedule.sequence_lengths(model.info.vision_tokens)[-1]
    return decoder, len(names), image_tokens, flops


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    smoke = "--smoke" in argv
    device = torch.device("cpu" if smoke else "cuda")
    batch = 2 if smoke else 32
    decoder, classes, tokens, flops = _decoder_and_flops(smoke, batch)
    decoder = decoder.to(device).train()
    width = decoder.layers[0]["ln_self"].normalized_shape[0]
    queries = torch.randn(classes, width, device=device, requires_grad=True)  # query_proj's output: trained
    image = torch.randn(batch, tokens, width, device=device, requires_grad=True)  # the prompted vision tower's
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=not smoke)

    def step():
        with torch.autocast(**amp):
            u = decoder(None, image, prepared=decoder.prepare(queries))
        u.float().square().mean().backward()

    n = 2 if smoke else 20
    plain = ms_per_call(step, device, n)
    graphed = graphed_ms_per_call(step, device, n)
    record = {"case": "mcpl_vaipl_decoder", "batch": batch, "classes": classes, "image_tokens": tokens, "width": width,
              "layers": len(decoder.layers), "fwd_bwd_ms_plain": round(plain, 3),
              "fwd_bwd_ms_graph": None if graphed is None else round(graphed, 3), "flops": flops,
              "tflops_graph": None if graphed is None else round(flops / graphed / 1e9, 1),
              **conditions(device, torch.bfloat16 if not smoke else torch.float32)}
    if not smoke:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        try:
            table = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
        except Exception:  # noqa: BLE001 - torch before 2.4 names it after CUDA
            table = events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
        out = os.environ.get("OUT", "/tmp")
        with open(os.path.join(out, "decoder_profile.txt"), "w") as f:
            f.write(json.dumps(record) + "\n(three plain forward + backward calls)\n" + table + "\n")
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
