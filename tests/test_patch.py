"""fastprompt.patch: exact against the unpatched model, reversible, idempotent, refusing what it cannot do."""

import copy

import open_clip
import pytest
import torch

import fastprompt
from fastprompt.backbones import create_clip
from fastprompt.fast import is_patched, patch, unpatch

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]


@pytest.fixture()
def clip64():
    model = create_clip("tiny").double()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _tokens(names=NAMES):
    return open_clip.get_tokenizer("ViT-B-16")([f"a photo of a {n}." for n in names])


def test_patched_encoders_match_and_unpatch_is_bit_exact(clip64):
    reference = copy.deepcopy(clip64)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    tokens = _tokens()
    with torch.no_grad():
        image_ref, text_ref = reference.encode_image(images), reference.encode_text(tokens)
        patch(clip64, backend="sdpa")
        assert is_patched(clip64)
        torch.testing.assert_close(clip64.encode_image(images), image_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(clip64.encode_text(tokens), text_ref, rtol=1e-12, atol=1e-12)
        unpatch(clip64)
        assert not is_patched(clip64)
        assert torch.equal(clip64.encode_image(images), image_ref)
        assert torch.equal(clip64.encode_text(tokens), text_ref)
    assert all(type(b) is open_clip.transformer.ResidualAttentionBlock for b in clip64.transformer.resblocks)


def test_state_dict_is_unchanged_and_loads_strictly(clip64):
    before = {k: (v.data_ptr(), v.shape) for k, v in clip64.state_dict().items()}
    patch(clip64)
    after = clip64.state_dict()
    assert {k: (v.data_ptr(), v.shape) for k, v in after.items()} == before
    clip64.load_state_dict(copy.deepcopy(after), strict=True)
    assert sum(1 for _ in clip64.parameters()) == len([k for k in before if "attn_mask" not in k])


def test_patching_twice_is_harmless_and_reports(clip64):
    patch(clip64, backend="sdpa")
    patch(clip64, backend="eager")
    report = clip64.fastprompt_patch
    assert report.blocks == {"vision": 12, "text": 12}
    assert report.kernels.attention == "eager"
    assert "12 vision blocks" in str(report)
    unpatch(clip64)
    assert all(type(b) is open_clip.transformer.ResidualAttentionBlock for b in clip64.visual.transformer.resblocks)


def test_unsupported_models_are_refused_and_left_untouched():
    scripted = torch.jit.script(create_clip("tiny"))
    with pytest.raises(fastprompt.UnsupportedModelError, match="TorchScript"):
        patch(scripted)
    model = create_clip("tiny")
    model.visual.transformer.resblocks[5] = open_clip.transformer.CustomResidualAttentionBlock(64, 2)
    with pytest.raises(fastprompt.UnsupportedModelError, match=r"resblocks\[5\]"):
        patch(model)
    # Nothing was patched in part.
    assert not is_patched(model)
    assert all(type(b).__name__ in ("ResidualAttentionBlock", "CustomResidualAttentionBlock")
               for b in model.visual.transformer.resblocks)


def test_explicit_backend_that_cannot_run_says_why(clip64):
    with pytest.raises(RuntimeError, match="xformers"):
        patch(create_clip("tiny"), backend="xformers")
    assert not is_patched(clip64)


def test_a_mask_that_is_not_causal_falls_back_exactly(clip64):
    reference = copy.deepcopy(clip64)
    patch(clip64, backend="sdpa")
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    mask = torch.zeros(9, 9, dtype=torch.float64)
    mask[:, 4] = float("-inf")  # a key masked for everyone: not the causal pattern
    with torch.no_grad():
        ours = clip64.transformer.resblocks[0](x, attn_mask=mask)
        ref = reference.transformer.resblocks[0](x, attn_mask=mask)
    assert torch.equal(ours, ref)


METHOD_CASES = [(name, {}) for name in sorted(fastprompt.METHODS)] + [
    ("coop", {"class_specific": True}),
    ("mcpl", {"integration": "input"}),
] + [("mcpl", options) for options in (  # MCPL-CLIP's options (tests/test_method_mcpl.py says what each means)
    {"sa_to_text": False}, {"free_visual_prompts": True}, {"per_class_decoding": True}, {"pms": "none"},
    {"fusion": "cmpp"}, {"fusion": "cmpp", "cmpp_mean": "all_classes"}, {"shared_pms": True}, {"sa_scope": "joint"},
)] + [("mudpt", options) for options in (  # the injections other than the default cross-attention
    {"maps": "per_layer"}, {"injection": "self_attention", "maps": "per_layer"}, {"injection": "linear"},
)] + [("mpl", {"n_first": 1}), ("mmrl", {"space": "separate"}), ("mmrl", {"towers": "vision"})]


@pytest.mark.parametrize("name,options", METHOD_CASES, ids=lambda v: str(v))
def test_every_method_on_the_patched_model_equals_the_reference(clip64, name, options):
    """Patched blocks + packed text (shared prefix, packed suffixes, cached layers) against the unpatched
    reference path: features, logits, image-input and prompt gradients, in float64."""
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([0, 3])
    reference_clip = copy.deepcopy(clip64)
    torch.manual_seed(0)
    ref = fastprompt.build(name, reference_clip, NAMES, text_path="reference", **options).double()
    patch(clip64, backend="sdpa")
    fast = fastprompt.build(name, clip64, NAMES, **options).double()
    assert fast.uses_packed_text()
    fast.method.load_state_dict(ref.method.state_dict())
    results = []
    for model in (ref, fast):
        x = images.clone().requires_grad_(True)
        out = model(x)
        loss, _ = model.loss(out, labels)
        loss.backward()
        grads = {n: p.grad for n, p in model.method.named_parameters()}
        results.append((out, x.grad, grads))
    (o1, x1, g1), (o2, x2, g2) = results
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(o2.text_features, o1.text_features, **tol)
    torch.testing.assert_close(o2.image_features, o1.image_features, **tol)
    for head in o1.logits:
        torch.testing.assert_close(o2.logits[head], o1.logits[head], **tol)
    torch.testing.assert_close(x2, x1, **tol)
    assert g1.keys() == g2.keys()
    for pname in g1:
        assert g1[pname] is not None, pname  # every trainable part is reached
        torch.testing.assert_close(g2[pname], g1[pname], **tol)


def test_packed_text_computes_fewer_tokens_and_caches_layers_below_the_first_prompt(clip64):
    patch(clip64, backend="sdpa")
    model = fastprompt.build("mmrl", clip64, NAMES).double()
    model.trace = []
    model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    first = [layer for tower, layer, _ in model.trace if tower == "text"]
    assert first == list(range(1, 13))
    model.trace = []
    model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    # Text layers 1-5 see no prompt: computed once, then served from the cache.
    assert [layer for tower, layer, _ in model.trace if tower == "text"] == list(range(6, 13))
    packed = model._packed
    # The shared prefix "SOS a photo of a" runs once; each class keeps only its own tokens up to EOT.
    assert packed.prefix_len == 5
    assert int(packed.cu_seqlens[-1]) == int((model.prompts.lengths - 5).sum())


@pytest.mark.parametrize("mlp_gemm", ["triton", "cublas"])
def test_triton_kernel_path_equals_the_reference(mlp_gemm, kernel_device):
    """The whole fused path with fastprompt's Triton kernels (LayerNorm, frozen MLP on either first-GEMM plan,
    dense and prefix-varlen attention, grouped couplings, the pooled last blocks): MaPLe on a head-dim-64 model, in
    fp32 under the interpreter on a CPU; on a GPU compiled, in bf16 (the kernels' GPU dtype) against the fp32
    reference, to bf16's rounding."""
    gpu = kernel_device == "cuda"
    reference_clip = create_clip("small", device=kernel_device)
    clip = create_clip("small", precision="bf16" if gpu else "fp32", device=kernel_device)
    clip.load_state_dict(reference_clip.state_dict())
    torch.manual_seed(0)
    ref = fastprompt.build("maple", reference_clip, NAMES[:3], text_path="reference")
    patch(clip, backend="triton", mlp_gemm=mlp_gemm)
    assert clip.fastprompt_patch.kernels.norm_mlp == "triton"
    assert clip.fastprompt_patch.kernels.mlp_gemm == mlp_gemm
    assert f"first GEMM: {mlp_gemm}" in str(clip.fastprompt_patch)
    fast = fastprompt.build("maple", clip, NAMES[:3])
    fast.method.load_state_dict(ref.method.state_dict())
    assert fast.grouped_maps() is not None
    images, labels = torch.randn(2, 3, 64, 64, device=kernel_device), torch.tensor([0, 2], device=kernel_device)
    losses = []
    for model in (ref, fast):
        out = model(images)
        loss, _ = model.loss(out, labels)
        loss.backward()
        losses.append((out, loss))
    if not gpu:
        torch.testing.assert_close(losses[1][0].logits["main"], losses[0][0].logits["main"], rtol=1e-4, atol=1e-4)
        for (pname, a), b in zip(ref.method.named_parameters(), fast.method.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=pname)
        return
    unit = lambda t: torch.nn.functional.normalize(t.float().flatten(1), dim=-1)  # noqa: E731
    for name in ("image_features", "text_features"):
        torch.testing.assert_close(unit(getattr(losses[1][0], name)), unit(getattr(losses[0][0], name)), rtol=0,
                                   atol=2e-2, msg=name)
    for (pname, a), b in zip(ref.method.named_parameters(), fast.method.parameters()):
        torch.testing.assert_close(unit(b.grad.flatten()[None]), unit(a.grad.flatten()[None]), rtol=0, atol=5e-2,
                                   msg=pname)


def test_triton_on_cpu_tensors_fails_here_as_it_does_on_a_gpu_machine():
    """A test that does not ask for kernel_device sees no Triton interpreter (tests/conftest.py), as on a GPU
    machine: a CPU model cannot be patched onto the Triton kernels, and a launcher refuses CPU tensors. Without that
    guard this CPU suite would pass tests that fail on the GPU."""
    with pytest.raises(RuntimeError, match="backend='triton' requested on a CPU model"):
        patch(create_clip("small"), backend="triton")
    from fastprompt.kernels import layer_norm

    x, w = torch.randn(4, 64), torch.ones(64)
    with pytest.raises(ValueError, match="CUDA"):
        layer_norm.layer_norm_forward(x, w, torch.zeros(64), 1e-5)


def test_mlp_gemm_follows_the_measurement_of_the_device_type_and_refuses_unknown_plans(clip64):
    """'auto' takes the plan measured on the device type (fastprompt.ops.gemm_plan): the CUDA entry's, and
    'triton' where nothing was measured (a CPU under the interpreter); the report names the evidence."""
    from fastprompt.ops import gemm_plan

    cuda = gemm_plan.measurement_for("cuda")
    assert cuda is not None and cuda.plan in gemm_plan.PLANS
    plan, why = gemm_plan.resolve("auto", "cuda")
    assert plan == cuda.plan and cuda.device in why and cuda.commit in why and cuda.date in why
    assert gemm_plan.resolve("auto", "cpu")[0] == "triton"
    assert gemm_plan.resolve("cublas", "cpu") == ("cublas", "MLP first GEMM: cublas (requested)")
    with pytest.raises(ValueError, match="mlp_gemm must be 'auto', 'triton' or 'cublas', got 'cutlass'"):
        patch(clip64, backend="sdpa", mlp_gemm="cutlass")
    assert not is_patched(clip64)
    patch(clip64, backend="sdpa", mlp_gemm="cublas")  # PyTorch ops for the MLP: the plan has nothing to choose
    assert clip64.fastprompt_patch.kernels.norm_mlp == "torch"
    assert "first GEMM" not in str(clip64.fastprompt_patch)
