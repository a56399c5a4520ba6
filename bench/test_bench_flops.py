"""The FLOP arithmetic against PERFORMANCE.md §1 (ViT-B/16 shapes, ImageNet's 1000 class names)."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest

from fastprompt.memory import step_geometry, structural_model

from .contenders import contender_options
from .flops import layer_flops, peak_flops, step_flops

EAGER = contender_options("eager", "cuda")
T_MAX = dataclasses.replace(EAGER, full_context=False)  # reference rows cut after the longest class's EOT
TUNED = contender_options("tuned", "cuda")
FASTPROMPT = contender_options("fastprompt", "cuda")
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
        ("maple", FASTPROMPT, 2.94),  # shared prefix once + packed suffixes: 4,170 text tokens
        ("coop", EAGER, 13.19),
        ("coop", T_MAX, 5.72),  # T_max = 30
        ("mmrl", EAGER, 12.96),  # + frozen image forward
        ("mmrl", T_MAX, 5.58),
    ],
)
def test_step_flops_match_performance_table(models, method, options, expected):
    assert tflops(models[method], 32, options) == pytest.approx(expected, rel=3e-3)


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
