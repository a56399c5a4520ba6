"""The contenders build what bench/README.md says they run: patching, text path and length, weight dtype, the step's
mode, the attention path of `tuned`, and the memory description of each (contender_options) against the built
model; on a GPU, the fastprompt contender's captured graph steps like its eager step."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.memory import options_for_model

from .contenders import CONTENDERS, build_contender, build_model, contender_options

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]
TINY_LAYERS = 12  # the tiny CLIP (fastprompt.backbones.TINY_CONFIGS["tiny"]): 12 blocks per tower


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes; an oversubscribed pool on a busy 2-core machine costs 5-10x
    yield
    torch.set_num_threads(threads)


def test_contenders_build_what_they_promise():
    eager, eager_step = build_contender("eager", "coop", NAMES, backbone="tiny", amp_dtype=torch.bfloat16)
    assert not fastprompt.is_patched(eager.clip) and not eager.uses_packed_text()
    assert eager.truncate_text is False and eager.clip.visual.conv1.weight.dtype == torch.float32
    assert eager_step.mode == "eager" and eager_step.amp_dtype == torch.bfloat16
    fast, fast_step = build_contender("fastprompt", "coop", NAMES, backbone="tiny", amp_dtype=torch.bfloat16)
    assert fastprompt.is_patched(fast.clip) and fast.uses_packed_text()
    assert fast.clip.visual.conv1.weight.dtype == torch.bfloat16  # frozen weights in the autocast dtype
    assert fast_step.cuda_graph == "auto"
    _, compiled_step = build_contender("compiled", "coop", NAMES, backbone="tiny", amp_dtype=None)
    assert compiled_step.mode == "compiled" and compiled_step.graph_reason == "compile=True"
    tuned, tuned_step = build_contender("tuned", "coop", NAMES, backbone="tiny", amp_dtype=torch.bfloat16)
    assert not fastprompt.is_patched(tuned.clip) and not tuned.uses_packed_text() and tuned.truncate_text
    assert tuned.clip.visual.conv1.weight.dtype == torch.bfloat16
    assert tuned_step.mode == "compiled" and tuned_step.amp_dtype == torch.bfloat16
    assert CONTENDERS["fastprompt"].clip_precision(None) == "fp32"
    with pytest.raises(ValueError, match="unknown contender 'fast'"):
        build_contender("fast", "coop", NAMES, backbone="tiny")
    with pytest.raises(ValueError, match="unknown contender 'fast'"):
        contender_options("fast")


@pytest.mark.parametrize("name", list(CONTENDERS))
def test_memory_description_matches_the_built_contender(name):
    model = build_model(name, "maple", NAMES, backbone="tiny", amp_dtype=torch.bfloat16)
    assert options_for_model(model, torch.bfloat16) == contender_options(name, "cpu", torch.bfloat16)


def _attention_calls(monkeypatch):
    """Every F.scaled_dot_product_attention call (query shape, mask) and every call of the native MHA fast path,
    which bypasses SDPA (nn.MultiheadAttention in eval + no_grad without autocast)."""
    calls = []
    sdpa, native = F.scaled_dot_product_attention, torch._native_multi_head_attention

    def recording_sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append(("sdpa", tuple(query.shape), attn_mask is not None))
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    def recording_native(*args, **kwargs):
        calls.append(("native", tuple(args[0].shape), None))
        return native(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(torch, "_native_multi_head_attention", recording_native)
    return calls


def test_tuned_attention_is_sdpa_on_text_cut_after_the_longest_eot(monkeypatch):
    """open_clip's blocks call nn.MultiheadAttention batch-first without weights, so a block that gradients flow
    through runs F.scaled_dot_product_attention: MaPLe trains through every block of both towers, all 24 run SDPA,
    the text at the longest class prompt's length (SOS + tokens + EOT, from open_clip's tokenizer) for `tuned`, at 77
    for `eager`. A block without gradients (eval under no_grad; a frozen tower) may take the native MHA fast path
    instead, fused too; it needs no float mask (so never the text) and autocast off as torch.is_autocast_enabled()
    sees it, i.e. CUDA's: on a GPU under autocast, as the bench's inference runs, every block runs SDPA."""
    calls = _attention_calls(monkeypatch)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    for name in ("tuned", "eager"):
        for method, training in (("maple", True), ("coop", False)):
            model = build_model(name, method, NAMES, backbone="tiny", amp_dtype=torch.bfloat16).train(training)
            longest = max(len(tokenizer.encode(model.method.template.format(n))) + 2 for n in NAMES)
            text_length = longest if name == "tuned" else 77
            assert text_length < 77 or name == "eager"
            calls.clear()
            with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(torch.randn(2, 3, *model.info.image_size))
                if training:
                    model.loss(out, torch.tensor([0, 3]))[0].backward()
            text = [shape for kind, shape, masked in calls if kind == "sdpa" and masked]  # (N, heads, L, head_dim)
            assert [shape[2] for shape in text] == [text_length] * TINY_LAYERS, (name, method)
            vision = [call for call in calls if not call[2]]
            assert len(vision) == TINY_LAYERS and len(calls) == 2 * TINY_LAYERS, (name, method, calls)
            if training:
                assert all(kind == "sdpa" for kind, _, _ in calls), (name, calls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graph capture)")
@pytest.mark.parametrize("method", ["maple", "cocoop", "mmrl"])
def test_fastprompt_contender_captures_and_matches_eager(method):
    model, step = build_contender("fastprompt", method, NAMES, backbone="tiny", device="cuda",
                                  amp_dtype=torch.bfloat16, warmup_steps=2)
    reference, ref_step = build_contender("fastprompt", method, NAMES, backbone="tiny", device="cuda",
                                          amp_dtype=torch.bfloat16)
    ref_step.cuda_graph = False
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        images = torch.randn(2, 3, 32, 32, generator=generator).cuda()
        labels = torch.randint(0, len(NAMES), (2,), generator=generator).cuda()
        torch.testing.assert_close(step(images, labels), ref_step(images, labels), rtol=2e-2, atol=2e-2)
    assert step.mode == "cuda_graph", step.graph_reason
    for p, q in zip(model.trainable_parameters(), reference.trainable_parameters()):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3)
