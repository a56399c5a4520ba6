"""The FLOP arithmetic against PERFORMANCE.md §1 (ViT-B/16 shapes, ImageNet's 1000 class names)."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest

from fastprompt.memory import options_for_model, step_geometry, structural_model

from .contenders import contender_options
from .flops import inference_flops, layer_flops, peak_flops, step_flops

EAGER = contender_options("eager", "cuda")
T_MAX = dataclasses.replace(EAGER, full_context=False)  # reference rows cut after the longest class's EOT
TUNED = contender_options("tuned", "cuda")
FASTPROMPT = contender_options("fastprompt", "cuda")
# PERFORMANCE.md's table leaves out the last-layer trim that fastprompt makes (the pooled last blocks).
FASTPROMPT_FULL = dataclasses.replace(FASTPROMPT, pooled_last_layer=False)
NAMES = list(open_clip.IMAGENET_CLASSNAMES)


@pytest.fixture(scope="module")
def models():
    return {m: structural_model(m, NAMES) for m in ("maple", "coop", "mmrl")}


def tflops(model, batch, options):
    return step_flops(step_geometry(model, batch, options)).total / 1e12


def test_per_encoder_forward_matches_open_clip_profile(models):
    # open_clip docs/model_profile.csv: ViT-B/16 image 35.13 GFLOP (incl. 0.23 patch embedding), text 5.96 GFLOP.
    geometry = step_geometry(models["coop"], 1, EAGER)
    vision, text = geometry.pass_named("vision"), geometry.pass_named("text")
    assert not any(layer.grad for layer in vision.layers)  # CoOp: image encoder forward only
    vision_flops = sum(layer_flops(vision, layer) for layer in vision.layers) + vision.embed_flops
    assert vision_flops == pytest.approx(35.13e9, rel=2e-3)
    forward_text = [dataclasses.replace(layer, grad=False) for layer in text.layers]
    assert sum(layer_flops(text, layer) for layer in forward_text) / 1000 == pytest.approx(5.96e9, rel=2e-3)


@pytest.mark.parametrize(
    "method, options, expected",
    [
        ("maple", EAGER, 14.38),  # T = 77
        ("maple", T_MAX, 5.05),  # T_max = 18
        ("maple", TUNED, 5.05),  # the tuned contender computes the T_max rows (bf16 weights change no FLOP)
        ("maple", FASTPROMPT_FULL, 2.94),  # shared prefix once + packed suffixes: 4,170 text tokens
        ("coop", EAGER, 13.19),
        ("coop", T_MAX, 5.72),  # T_max = 30
        ("mmrl", EAGER, 12.96),  # + frozen image forward
        ("mmrl", T_MAX, 5.58),
    ],
)
def test_step_flops_match_performance_table(models, method, options, expected):
    assert tflops(models[method], 32, options) == pytest.approx(expected, rel=3e-3)


def test_pooled_last_blocks_remove_what_the_formula_says(models):
    """MaPLe, C = 1000, B = 32: the vision tower's last block (199 tokens, trained through: GEMMs forward + input
    gradient, attention x3) keeps its qkv GEMM on every row and finishes 32 CLS rows with 32 queries; the text
    tower's last block (4,170 packed rows, attention whole) finishes 1,000 EOT rows."""
    geometry = step_geometry(models["maple"], 32, FASTPROMPT)
    assert FASTPROMPT.pooled_last_layer and geometry.pass_named("vision").layers[-1].pooled
    full, pooled = tflops(models["maple"], 32, FASTPROMPT_FULL) * 1e12, step_flops(geometry).total
    d, m, n, b = 768, 3072, 199, 32
    vision = 2 * 2 * (b * n - b) * (d * d + 2 * d * m) + 3 * 4 * d * (b * n * n - b * n)
    dt, mt = 512, 2048
    text = 2 * 2 * (4170 - 1000) * (dt * dt + 2 * dt * mt)
    assert round(full) - pooled == vision + text
    assert pooled / 1e12 == pytest.approx(2.77, rel=3e-3)  # 6 % less work per step


def test_text_tokens_are_what_each_contender_computes(models):
    assert step_flops(step_geometry(models["maple"], 32, EAGER)).text_tokens == 77_000
    assert step_flops(step_geometry(models["maple"], 32, FASTPROMPT)).text_tokens == 4_170


def test_floor_peak_is_the_h200s_and_overridable(monkeypatch):
    monkeypatch.delenv("FASTPROMPT_BENCH_PEAK_TFLOPS", raising=False)
    assert peak_flops("NVIDIA H200")[0] == 790e12
    value, reason = peak_flops("x86_64")
    assert value is None and "FASTPROMPT_BENCH_PEAK_TFLOPS" in reason
    monkeypatch.setenv("FASTPROMPT_BENCH_PEAK_TFLOPS", "989")
    assert peak_flops("NVIDIA H100")[0] == 989e12


def test_last_layer_script_reports_both_modes(capsys):
    """bench/last_layer.py (the pooled last blocks' A/B on a CPU) runs and reports each figure for both modes: the
    workload's step FLOPs fall, so does what autograd saves (VPT-deep trains through its last vision block)."""
    import json

    from .last_layer import main

    main(["--methods", "vpt_deep", "--backbone", "tiny", "--batch", "2", "--rounds", "1", "--threads", "1"])
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["method"] == "vpt_deep" and record["backbone"] == "tiny"
    flops, saved, ms = record["step_gflops_c1000_b32"], record["saved_mib"], record["inference_ms"]
    assert 0 < flops["pooled"] < flops["full"] and 0 < saved["pooled"] < saved["full"]
    assert ms["full"] > 0 and ms["pooled"] > 0


def _counted(fn):
    """torch.utils.flop_counter.FlopCounterMode's total over fn(), with SDPA's CPU kernels (absent from torch's table)
    counted by torch's own SDPA formulas, and open_clip's MultiheadAttention off its fused fast path (which the
    counter cannot see into)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: forward,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


def _small_model(method, patched):
    import fastprompt
    from fastprompt.backbones import create_clip

    clip = create_clip("small")
    if patched:
        fastprompt.patch(clip, backend="sdpa")  # every op an aten op the counter sees
    return fastprompt.build(method, clip, ["red circle", "blue square", "green triangle", "yellow star"])


METHODS = ["coop", "cocoop", "vpt_deep", "maple", "mpl", "mudpt", "mmrl", "mcpl"]
# The prompt networks outside the towers, which the count leaves out like the heads (< 0.1 % at ViT-B/16 scale),
# run with gradients in training: MMRL's representation mappings, MCPL's prompt self-attention and PMS MLPs, MuDPT's
# cross-modal injection. At the 'small' CLIP's scale they are 2-3 % of a step.
TRAIN_TOLERANCE = {"mmrl": 0.035, "mcpl": 0.035, "mudpt": 0.035}


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("method", METHODS)
def test_train_step_flops_equal_torchs_flop_counter(method, patched):
    """step_flops of the step's geometry (the benchmark's floor) against torch's FlopCounterMode over a training
    step (forward, loss, backward): frozen weights get no weight gradient, layers below the first learnable input run
    forward only, MMRL's teacher continues from the prompted pass's stem, CoCoOp's one vision pass, the pooled last
    blocks. Torch counts the attention backward as 2.5x the forward (FlashAttention recomputes the scores), the
    count as 2x: under 1 % of a step here."""
    import torch

    model = _small_model(method, patched).train()
    images, labels = torch.randn(8, 3, 64, 64), torch.arange(8) % 4

    def step():
        loss, _ = model.loss(model(images), labels)
        loss.backward()

    step()  # the first step builds what a run computes once (cached text layers, constant features)
    counted = step_flops(step_geometry(model, 8, options_for_model(model))).total
    assert _counted(step) == pytest.approx(counted, rel=TRAIN_TOLERANCE.get(method, 0.012))


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("method", METHODS)
def test_inference_flops_equal_torchs_flop_counter(method, patched):
    """inference_flops against torch's FlopCounterMode over `model(images)` in eval mode (the text cache warm): the
    GEMMs, the patch embedding and the attention. What the count must get right: the text of a class set cached
    except where it depends on the image (CoCoOp, MCPL), no teacher pass (MMRL), the instance-conditioned frozen
    pass, the pooled last vision block of a patched CLIP (not for MMRL and MCPL, which read every vision token), and
    nothing else running per batch (before the inference cache kept MuDPT's image-independent vision prompts, its
    cross-modal injection ran in every forward: 4 % more here)."""
    import torch

    model = _small_model(method, patched).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        model(images)  # builds the inference cache
        measured = _counted(lambda: model(images))
    counted = inference_flops(model, 3, options_for_model(model)).total
    # Left out of the count: the projections to the joint space and the logits (3 images, 4 classes).
    assert measured == pytest.approx(counted, rel=3e-3)
