"""A CNN vision tower (open_clip's ModifiedResNet: RN50, RN101, RN50x4..64, the backbone of CoOp's main results) runs
the methods that prompt only the text, as a frozen feature extractor, and refuses every method that prompts vision.

References come from open_clip itself, not from fastprompt: CoOp initialised from "a photo of a" has the hand
template's exact prompt, so before any training its logits must equal open_clip's zero-shot logits
(`encode_image`, `encode_text` of the tokenized template, `logit_scale`). Training must leave the CNN exactly as it
was, its BatchNorm statistics included: a BatchNorm left in training mode would normalise with each batch's own
statistics and overwrite the running ones, which the frozen towers of the ViTs (LayerNorm only) could not show.
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

import fastprompt
from fastprompt.backbones import TINY_CONFIGS, create_clip
from fastprompt.training import TrainStep, make_optimizer

NAMES = ["red circle", "blue square", "green triangle"]
CONFIG = TINY_CONFIGS["tiny-rn50"]


@pytest.fixture(scope="module")
def clip64():
    return create_clip("tiny-rn50").double().requires_grad_(False)


def images(n=3, dtype=torch.float64):
    size = CONFIG["vision_cfg"]["image_size"]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n), dtype=dtype)


def open_clip_logits(clip, x, template="a photo of a {}."):
    tokens = open_clip.get_tokenizer("ViT-B-16")([template.format(name) for name in NAMES])
    with torch.no_grad():
        image = torch.nn.functional.normalize(clip.encode_image(x), dim=-1)
        text = torch.nn.functional.normalize(clip.encode_text(tokens), dim=-1)
        return clip.logit_scale.exp() * image @ text.T


def test_the_backbone_facts_come_from_the_cnn(clip64):
    info = fastprompt.inspect_clip(clip64)
    assert info.vision_tower == "cnn" and info.vision.layers == 0 and info.vision_tokens == 0
    assert info.embed_dim == CONFIG["embed_dim"]
    assert info.image_size == (CONFIG["vision_cfg"]["image_size"],) * 2
    assert (info.text.width, info.text.layers) == (CONFIG["text_cfg"]["width"], CONFIG["text_cfg"]["layers"])


@pytest.mark.parametrize("patched", [False, True], ids=["reference", "patched"])
@pytest.mark.parametrize("method,options", [("clip", {}), ("coop", {"ctx_init": "a photo of a"}),
                                            ("cocoop", {}), ("deep_language", {"text_depth": 1})])
def test_untrained_prompts_give_open_clips_zero_shot_logits(clip64, patched, method, options):
    """CoCoOp's meta-net starts at a random shift, so it is compared with its shift zeroed (its second Linear); deep
    language prompting at depth 1 from "a photo of a" is the template too."""
    clip = copy.deepcopy(clip64)
    if patched:
        fastprompt.patch(clip, backend="sdpa")
    model = fastprompt.build(method, clip, NAMES, **options).double()
    if method == "cocoop":
        with torch.no_grad():
            for source in model.method.text_sources.values():
                last = [m for m in source.modules() if isinstance(m, torch.nn.Linear)][-1]
                last.weight.zero_(), last.bias.zero_()
    x = images()
    expected = open_clip_logits(clip64, x)
    for mode in (model.eval, model.train):  # a BatchNorm in training mode would change the image features
        mode()
        with torch.no_grad():
            out = model(x)
        # The logits are computed in float32 (as for every backbone, for mixed precision): float32's tolerance.
        torch.testing.assert_close(out.logits["main"], expected.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.image_features, clip64.encode_image(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["coop", "cocoop", "deep_language"])
def test_training_changes_the_prompts_and_nothing_of_the_cnn(method):
    clip = create_clip("tiny-rn50")
    before = copy.deepcopy(clip.state_dict())
    model = fastprompt.build(method, clip, NAMES)
    prompts = {name: p.detach().clone() for name, p in model.method.named_parameters()}
    step = TrainStep(model, make_optimizer(model.trainable_parameters(), "sgd", lr=0.1))
    model.train()
    for _ in range(3):
        step(images(4, torch.float32), torch.tensor([0, 1, 2, 0]))
    assert not any(m.training for m in clip.modules()), "the frozen CLIP must stay in eval mode"
    after = clip.state_dict()
    for name, tensor in before.items():  # BatchNorm running statistics and counters included
        assert torch.equal(after[name], tensor), name
    assert any("running_mean" in name for name in before)
    moved = [n for n, p in model.method.named_parameters() if not torch.equal(p.detach(), prompts[n])]
    assert moved, "a training step must change the prompts"


@pytest.mark.parametrize("method", ["coop", "cocoop", "deep_language"])
def test_patched_text_path_equals_the_reference_with_gradients(clip64, method):
    fast_clip = copy.deepcopy(clip64)
    fastprompt.patch(fast_clip, backend="sdpa")
    ref = fastprompt.build(method, clip64, NAMES, text_path="reference").double()
    fast = fastprompt.build(method, fast_clip, NAMES).double()
    assert fast.uses_packed_text()
    fast.method.load_state_dict(ref.method.state_dict())
    x, labels = images(), torch.tensor([2, 0, 1])
    grads = []
    for model in (ref, fast):
        model.train()
        out = model(x)
        model.loss(out, labels)[0].backward()
        grads.append((out.logits["main"].detach(), {n: p.grad for n, p in model.method.named_parameters()}))
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l2, l1, rtol=1e-9, atol=1e-9)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method,options", [("maple", {}), ("vpt_deep", {}), ("ivlp", {}), ("ivlp", {"n_vision": 3}),
                                            ("mmrl", {}), ("promptsrc", {}), ("mpl", {}), ("mudpt", {}), ("mcpl", {})])
def test_a_method_that_prompts_vision_is_refused_in_one_line(clip64, method, options):
    with pytest.raises(fastprompt.UnsupportedModelError) as error:
        fastprompt.build(method, clip64, NAMES, **options)
    message = str(error.value)
    assert "\n" not in message
    assert f"method '{method}' puts prompts into the vision tower" in message and "ModifiedResNet" in message
    assert "coop, cocoop" in message and "ViT-B-16" in message


def test_ivlp_without_vision_prompts_runs(clip64):
    model = fastprompt.build("ivlp", clip64, NAMES, n_vision=0)
    assert not model.method.vision_schedule.prompted
    assert model(images()).logits["main"].shape == (3, len(NAMES))


def test_patch_swaps_the_text_tower_only_and_unpatches(clip64):
    clip = copy.deepcopy(clip64)
    tokens = open_clip.get_tokenizer("ViT-B-16")([f"a photo of a {c}." for c in NAMES])
    x = images()
    with torch.no_grad():
        text, image = clip.encode_text(tokens), clip.encode_image(x)
    fastprompt.patch(clip, backend="sdpa")
    report = clip.fastprompt_patch
    assert report.blocks == {"text": CONFIG["text_cfg"]["layers"]}
    assert "ModifiedResNet (CNN), left as open_clip runs it" in str(report)
    assert "forward" not in clip.visual.__dict__
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(tokens), text, rtol=1e-9, atol=1e-9)
        assert torch.equal(clip.encode_image(x), image)
    fastprompt.unpatch(clip)
    assert not fastprompt.is_patched(clip)
    with torch.no_grad():
        assert torch.equal(clip.encode_text(tokens), text)


def test_the_memory_predictor_says_it_does_not_cover_a_cnn(clip64):
    from fastprompt.memory import NotPredictedError, memory_line, predict_peak_memory

    model = fastprompt.build("coop", clip64, NAMES)
    with pytest.raises(NotPredictedError, match="ModifiedResNet"):
        predict_peak_memory(model, 4)
    line = memory_line(model, 4, fastprompt.memory.StepOptions(), 16 * 2**30)
    assert line.startswith("no memory prediction for a ModifiedResNet (CNN) vision tower") and "16.0 GiB" in line


def test_images_of_another_size_are_refused_with_the_cnn_size(clip64):
    model = fastprompt.build("coop", clip64, NAMES)
    with pytest.raises(ValueError, match=r"images are \(32, 32\) pixels but the model is for \(64, 64\)"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))


@pytest.mark.gpu
def test_graphed_steps_on_a_gpu_equal_eager_ones_and_keep_the_cnn():
    """On CUDA the training step is captured in a CUDA graph: the CNN (cuDNN convolutions, BatchNorm in eval mode)
    inside a replay must give the eager step's losses and leave every CNN tensor as it was."""
    clip = create_clip("tiny-rn50").cuda()
    before = copy.deepcopy(clip.state_dict())
    models = [fastprompt.build("coop", clip, NAMES) for _ in range(2)]
    models[1].method.load_state_dict(models[0].method.state_dict())
    steps = [TrainStep(m, make_optimizer(m.trainable_parameters(), "sgd", lr=0.05), warmup_steps=2, cuda_graph=graph)
             for m, graph in zip(models, (True, False))]
    generator = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(6):
        x = torch.randn(4, 3, 64, 64, device="cuda", generator=generator)
        y = torch.randint(0, len(NAMES), (4,), device="cuda", generator=generator)
        graphed, eager = (step(x, y) for step in steps)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    assert steps[0].mode == "cuda_graph"
    for name, tensor in clip.state_dict().items():
        assert torch.equal(tensor, before[name]), name
