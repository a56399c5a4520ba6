"""FLOPs of one training step and the floor they set (PERFORMANCE.md §1).

Per transformer layer and token rows N of width d with an MLP of width m: the four GEMMs cost
2 N (4 d^2 + 2 d m) FLOPs (= 24 N d^2 for m = 4d) and the attention core 4 d x (query-key pairs) (= 4 N^2 d for
a dense sequence; the square is counted whole for causal text too, the convention of open_clip's profile that
PERFORMANCE.md reproduces). A layer that backward runs through costs its GEMMs twice (forward + input gradient;
frozen weights get no weight gradient) and its attention core three times (dQ, dK, dV, dP); a layer with trained
weights (MCPL's decoder) costs its GEMMs three times. Layers below the first learnable input run forward only,
cached layers not at all. A tower's last block run on its pooled rows only (LayerWork.pooled: fastprompt's
default) costs its qkv GEMM on every row and the rest on one row per sequence. The patch embedding counts once per
vision pass (forward only). Token counts come from
fastprompt.memory.step_geometry, i.e. the tokens each contender actually computes: 77 per class for the eager
reference, SOS..EOT suffixes packed plus one shared prefix for fastprompt. Heads and losses are left out (< 0.1%).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from fastprompt.memory import LayerWork, Pass, StepGeometry, StepOptions, step_geometry

H200_BF16_PEAK = 790e12  # measured bf16 dense GEMM rate on this project's H200 (PERFORMANCE.md, machine figures)


def layer_flops(p: Pass, layer: LayerWork) -> int:
    d, m = p.width, p.mlp_hidden
    # The qkv GEMM on every row; the output projection and MLP on the finished rows (fewer in a pooled last block).
    linear = 2 * layer.rows * 3 * d * d + 2 * layer.finished_rows * (d * d + 2 * d * m)
    attention = 4 * d * layer.attention_pairs
    if layer.cross is not None:
        count, queries, keys = layer.cross
        linear += 2 * count * queries * 2 * d * d + 2 * count * keys * 2 * d * d  # q/out and k/v projections
        attention += 4 * d * count * queries * keys
    if not layer.grad:
        return linear + attention
    return linear * (3 if p.trained_weights else 2) + attention * 3


@dataclass(frozen=True)
class FlopCount:
    total: int
    by_pass: dict[str, int]
    text_tokens: int  # token rows of the last text layer computed per step (0: text features are constants)


def step_flops(geometry: StepGeometry) -> FlopCount:
    by_pass = {p.name: p.embed_flops + sum(layer_flops(p, layer) for layer in p.layers) for p in geometry.passes}
    text = geometry.pass_named("text")
    tokens = text.layers[-1].rows if text is not None and text.layers else 0
    return FlopCount(sum(by_pass.values()), by_pass, tokens)


def train_step_flops(model, batch: int, options: StepOptions) -> FlopCount:
    """FLOPs of one training step of `model` at batch `batch` (the `train_step` kind)."""
    return step_flops(step_geometry(model, batch, options))


def inference_flops(model, batch: int, options: StepOptions) -> FlopCount:
    """FLOPs of `model(images)` in eval mode at batch `batch`, as evaluation runs it (the `inference` kind): the text
    features of a class set are cached (PromptedCLIP.inference_cache), so only what depends on the images runs,
    forward only: the prompted vision pass (its last block pooled as in training); the frozen image pass of
    instance-conditioned methods whose vision tower is prompted; the text pass when the text depends on the image
    (CoCoOp, MCPL's input integration); MCPL's VAIPL decoder. The loss's frozen teachers (MMRL, PromptSRC) do not
    run. The passes are the training step's (fastprompt.memory.step_geometry), without their backward."""
    names = {"vision", "vision (frozen, conditioning)", "vaipl decoder"}
    if model.method.per_image_text():
        names.add("text")
    geometry = step_geometry(model, batch, options)
    forward = [dataclasses.replace(p, layers=tuple(dataclasses.replace(layer, grad=False) for layer in p.layers))
               for p in geometry.passes if p.name in names]
    return step_flops(dataclasses.replace(geometry, passes=tuple(forward)))


def peak_flops(device_name: str) -> tuple[float | None, str]:
    """(peak FLOP/s for the floor, where it comes from). FASTPROMPT_BENCH_PEAK_TFLOPS overrides."""
    override = os.environ.get("FASTPROMPT_BENCH_PEAK_TFLOPS")
    if override:
        try:
            value = float(override) * 1e12
        except ValueError:
            raise ValueError(f"FASTPROMPT_BENCH_PEAK_TFLOPS must be a number, got {override!r}") from None
        return value, f"FASTPROMPT_BENCH_PEAK_TFLOPS={override}"
    if "H200" in device_name:
        return H200_BF16_PEAK, "H200 bf16 dense GEMM, measured (PERFORMANCE.md)"
    return None, f"no measured bf16 peak for {device_name!r}; set FASTPROMPT_BENCH_PEAK_TFLOPS to compute the floor"
