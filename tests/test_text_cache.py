"""The inference cache (PromptedCLIP.inference_cache): what an eval forward under no_grad reuses (text features,
coupled prompt tokens of both towers, MCPL's class queries) equals what a fresh model computes, it is really reused,
and every event that changes those values invalidates it.

The reference is always independent of the cache: a second model built from scratch on the same CLIP with the
method's state loaded, run with gradients enabled (nothing is cached then). float64 on the tiny CLIP, so a stale
value shows as a difference of 1e-3 or more against a tolerance of 1e-10.
"""

import copy

import pytest
import torch

import fastprompt
from fastprompt.training import make_optimizer

NAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross"]
OTHER = ["cyan ring", "orange hexagon", "white moon"]
METHODS = ["clip", "coop", "cocoop", "vpt_deep", "deep_language", "ivlp", "maple", "mpl", "mudpt", "mmrl", "promptsrc",
           "mcpl"]


def images(n=2, dtype=torch.float64):
    return torch.randn(n, 3, 32, 32, dtype=dtype)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def build(method, clip, names=NAMES, **options):
    model = fastprompt.build(method, clip, names, **options)
    return model.to(next(clip.parameters()).dtype).eval()


def fresh(model, x, names=None, clip=None, **options):
    """Logits of an independent twin: built anew, the method's state copied in, computed with gradients on."""
    twin = fastprompt.build(model.method.name, clip or model.clip, list(names or model.classnames), **options)
    twin = twin.to(next((clip or model.clip).parameters()).dtype).eval()
    twin.method.load_state_dict(model.method.state_dict())
    if twin.method.template != model.method.template:
        twin.method.template = model.method.template
        twin.set_classnames(twin.classnames)
    with torch.enable_grad():
        return twin.predict(twin(x)).detach()


def infer(model, x):
    with torch.no_grad():
        return model.predict(model(x))


def count_text_passes(model, monkeypatch) -> list:
    calls = []
    original = model.encode_text

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "encode_text", counted)
    return calls


def perturb_(module):
    """A random change of every parameter (a constant shift would be removed by the LayerNorms)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)


# --- the cache serves what a fresh model computes, and is reused -----------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_cached_inference_equals_a_fresh_model_and_reuses_the_text(method, tiny_clip64, monkeypatch):
    model = build(method, tiny_clip64)
    perturb_(model.method)  # away from the initialisation, so every prompt matters
    passes = count_text_passes(model, monkeypatch)
    for _ in range(3):
        x = images()
        close(infer(model, x), fresh(model, x))
    per_image = model.method.per_image_text()
    assert len(passes) == (3 if per_image else 1)


def test_mcpl_input_integration_caches_its_vision_prompts_and_stays_exact(tiny_clip64):
    model = build("mcpl", tiny_clip64, integration="input")
    perturb_(model.method)
    pms_calls = []
    model.method.pms[0].register_forward_hook(lambda *_: pms_calls.append(1))
    for _ in range(2):
        x = images()
        close(infer(model, x), fresh(model, x, integration="input"))
    assert len(pms_calls) == 1  # PMS_1(S(P_1)) ran once for both batches


def test_coupled_prompts_and_mcpl_class_queries_are_computed_once(tiny_clip64, monkeypatch):
    maple = build("maple", tiny_clip64)
    maps = []
    for source in maple.method.vision_sources.values():
        source.mapping.register_forward_hook(lambda *_: maps.append(1))
    for _ in range(3):
        infer(maple, images())
    assert len(maps) == len(maple.method.vision_sources)  # each coupling once, not once per batch

    mcpl = build("mcpl", tiny_clip64)
    prepared = []
    original = mcpl.method.decoder.prepare
    monkeypatch.setattr(mcpl.method.decoder, "prepare", lambda q: prepared.append(1) or original(q))
    for _ in range(3):
        infer(mcpl, images())
    assert len(prepared) == 1
    mcpl.train()
    x = images()
    out = mcpl(x)  # training: VAIPL's class part runs in the forward, with gradients
    assert len(prepared) == 2 and out.logits["main"].requires_grad


@pytest.mark.parametrize("maps", ["shared", "per_layer"])
def test_mudpt_cross_modal_injection_runs_once_for_every_batch(maps, tiny_clip64):
    """MuDPT's vision prompts (V_l + V~_l) depend on no image: the cache computes them with the text, and a batch
    runs no injection (before, each forward ran it again, one batched call or one per layer)."""
    model = build("mudpt", tiny_clip64, maps=maps)
    perturb_(model.method)
    injections = {id(layer.injection): layer.injection for source in model.method.vision_sources.values()
                  for layer in [source.second.layer]}
    calls = []
    for injection in injections.values():
        injection.register_forward_hook(lambda *_: calls.append(1))
    for _ in range(3):
        x = images()
        close(infer(model, x), fresh(model, x, maps=maps))
    assert len(calls) == (1 if maps == "shared" else len(injections))  # at the cache build only


@pytest.mark.parametrize("method", ["maple", "mcpl"])
def test_grouped_coupling_maps_are_cached_exactly(method, tiny_clip, kernel_device, monkeypatch):
    """With the grouped launch (the fast path's, fp32: the Triton interpreter on a CPU, compiled on a GPU) the cache
    holds what an uncached grouped forward computes, and the grouped launch runs once for all batches."""
    model = build(method, copy.deepcopy(tiny_clip).to(kernel_device))
    model.use_grouped_maps = True
    perturb_(model.method)
    runs = []
    grouped = model.grouped_maps()
    original = grouped.run
    monkeypatch.setattr(grouped, "run", lambda ctx: runs.append(1) or original(ctx))
    x = images(dtype=torch.float32).to(kernel_device)
    cached = [infer(model, x) for _ in range(2)]
    with torch.enable_grad():
        uncached = model.predict(model(x)).detach()
    assert torch.equal(cached[0], cached[1])
    torch.testing.assert_close(cached[0], uncached, rtol=1e-5, atol=1e-6)  # fp32: gradient mode's op order differs
    assert len(runs) == 2  # once for the cache, once for the uncached forward


# --- each event invalidates ---------------------------------------------------------------------------------------
def test_set_classnames(tiny_clip64):
    model = build("maple", tiny_clip64)
    infer(model, images())
    model.set_classnames(OTHER)
    x = images()
    close(infer(model, x), fresh(model, x, names=OTHER))


def test_template_change_rebuilds_the_class_prompts(tiny_clip64):
    model = build("clip", tiny_clip64)  # no text prompts: its text features are cached even in training
    infer(model, images())
    model.method.template = "a blurry sketch of a {}."
    x = images()
    twin = build("clip", tiny_clip64, template="a blurry sketch of a {}.")
    close(infer(model, x), fresh(twin, x))  # the twin is built with the template
    assert not torch.allclose(infer(model, x), fresh(build("clip", tiny_clip64), x), atol=1e-4)


@pytest.mark.parametrize("kind", ["fused-sgd", "adamw-foreach", "sgd-for-loop"])
def test_an_optimizer_step(kind, tiny_clip64):
    model = build("maple", tiny_clip64)
    params = model.trainable_parameters()
    if kind == "fused-sgd":
        optimizer = make_optimizer(params, "sgd", lr=0.5)
        assert optimizer.param_groups[0]["fused"]  # in-place updates by one fused kernel
    elif kind == "adamw-foreach":
        optimizer = torch.optim.AdamW(params, lr=0.05, foreach=True)
    else:
        optimizer = torch.optim.SGD(params, lr=0.5, foreach=False)
    x, labels = images(), torch.tensor([0, 1])
    before = infer(model, x)
    loss, _ = model.loss(model(x), labels)  # still in eval mode: only the step itself can invalidate
    loss.backward()
    optimizer.step()
    after = infer(model, x)
    assert (after - before).abs().max() > 1e-6
    close(after, fresh(model, x))


def test_a_train_step_between_evaluations_without_mode_changes(tiny_clip64):
    """A user loop that never calls train(): the parameters' versions alone invalidate."""
    model = build("mcpl", tiny_clip64)
    optimizer = make_optimizer(model.trainable_parameters(), "sgd", lr=0.5)
    x = images()
    infer(model, x)
    loss, _ = model.loss(model(x), torch.tensor([2, 3]))  # eval mode, gradients on: nothing cached
    loss.backward()
    optimizer.step()
    close(infer(model, x), fresh(model, x))


def test_load_state_dict_copy_and_assign(tiny_clip64):
    model = build("maple", tiny_clip64)
    donor = build("maple", tiny_clip64)
    perturb_(donor.method)
    x = images()
    infer(model, x)
    # New Parameters from fresh tensors: their version counters start at 0 like the old ones; only the address shows.
    model.method.load_state_dict({k: v.clone() for k, v in donor.method.state_dict().items()}, assign=True)
    close(infer(model, x), fresh(donor, x))
    perturb_(donor.method)
    model.method.load_state_dict(donor.method.state_dict())  # copy_ into the same storage: only the version shows
    close(infer(model, x), fresh(donor, x))
    perturb_(donor.method)
    with torch.no_grad():
        for mine, theirs in zip(model.method.parameters(), donor.method.parameters()):
            mine.data = theirs.detach().clone()  # `.data =` keeps the Parameter and its version counter
    close(infer(model, x), fresh(donor, x))


def test_checkpoint_loading(tiny_clip64, tmp_path):
    from fastprompt.runner import checkpoint as ckpt

    donor = build("mcpl", tiny_clip64)
    perturb_(donor.method)
    ckpt.save_checkpoint(str(tmp_path), donor, "mcpl", {}, ckpt.backbone_record(donor, "tiny", None))
    model = build("mcpl", tiny_clip64)
    x = images()
    infer(model, x)
    manifest, tensors = ckpt.load_checkpoint(str(tmp_path))
    ckpt.load_into(model, manifest, tensors)
    close(infer(model, x), fresh(donor, x))


def test_training_mode_is_never_served_from_the_cache(tiny_clip64, monkeypatch):
    model = build("coop", tiny_clip64)
    passes = count_text_passes(model, monkeypatch)
    infer(model, images())
    model.train()
    for _ in range(2):
        infer(model, images())  # no_grad but training mode: computed each time
    assert len(passes) == 3
    model.eval()
    infer(model, images())
    assert len(passes) == 4  # train() dropped the eval entry


def test_a_dtype_change(tiny_clip):
    model = build("maple", copy.deepcopy(tiny_clip))
    x = images(dtype=torch.float32)
    infer(model, x)
    model.double()
    x = x.double()
    with torch.no_grad():
        assert model(x).text_features.dtype == torch.float64
    close(infer(model, x), fresh(model, x))


def test_autocast_dtype_is_part_of_the_key(tiny_clip):
    model = build("maple", tiny_clip)
    x = images(dtype=torch.float32)
    with torch.no_grad():
        plain = model(x).text_features
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_amp = model(x).text_features
        again = model(x).text_features
    assert plain.dtype == again.dtype == torch.float32 and under_amp.dtype == torch.bfloat16
    with torch.enable_grad():
        reference = model(x).text_features.detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference_amp = model(x).text_features.detach()
    assert torch.equal(plain, reference) and torch.equal(again, reference) and torch.equal(under_amp, reference_amp)


def test_new_frozen_clip_weights(tiny_clip64):
    clip = copy.deepcopy(tiny_clip64)
    model = build("maple", clip)
    x = images()
    infer(model, x)
    donor = copy.deepcopy(clip)
    perturb_(donor)
    clip.load_state_dict(donor.state_dict())
    close(infer(model, x), fresh(model, x, clip=donor))


def test_clear_cache_after_an_edit_the_key_cannot_see(tiny_clip64):
    # Writing through `.data` bumps no version counter: the key cannot see it, and clear_cache is the documented way.
    clip = copy.deepcopy(tiny_clip64)
    model = build("maple", clip)
    x = images()
    before = infer(model, x)
    with torch.no_grad():
        for block in clip.transformer.resblocks:
            block.mlp.c_fc.weight.data.mul_(1.5)
    close(infer(model, x), before)  # still the cached text features
    model.clear_cache()
    close(infer(model, x), fresh(model, x))
    assert not torch.allclose(infer(model, x), before)


def test_frozen_text_features_follow_the_clip_weights_and_dtype(tiny_clip):
    clip = copy.deepcopy(tiny_clip)
    model = build("promptsrc", clip)
    templates = ("a photo of a {}.", "a sketch of a {}.")

    def direct(c):
        tok = model.tokenizer
        feats = [torch.nn.functional.normalize(c.encode_text(tok([t.format(n) for n in NAMES])).float(), dim=-1)
                 for t in templates]
        return torch.nn.functional.normalize(torch.stack(feats).mean(0), dim=-1)

    first = model.frozen_text_features(templates)
    with torch.no_grad():
        close(first, direct(clip), tol=1e-6)
        donor = copy.deepcopy(clip)
        perturb_(donor)
        clip.load_state_dict(donor.state_dict())
        close(model.frozen_text_features(templates), direct(clip), tol=1e-6)
        model.double()
        assert model.frozen_text_features(templates).dtype == torch.float32  # normalised in fp32, as before
        close(model.frozen_text_features(templates), direct(clip), tol=1e-6)
        assert model.frozen_text_features(templates) is model.frozen_text_features(templates)


def test_predictor_reuses_the_text_features_across_calls(tiny_clip64, tmp_path, monkeypatch):
    from fastprompt.runner import Predictor
    from fastprompt.runner import checkpoint as ckpt

    donor = build("maple", tiny_clip64)
    perturb_(donor.method)
    ckpt.save_checkpoint(str(tmp_path), donor, "maple", {}, ckpt.backbone_record(donor, "tiny", None))
    predictor = Predictor(str(tmp_path), OTHER, clip=tiny_clip64)
    passes = count_text_passes(predictor.model, monkeypatch)
    for _ in range(2):
        x = images()
        close(predictor(x), fresh(donor, x, names=OTHER).softmax(-1).float(), tol=1e-6)  # it returns fp32
    assert len(passes) == 1


@pytest.mark.gpu
def test_a_device_change(tiny_clip):
    model = build("maple", copy.deepcopy(tiny_clip))
    x = images(dtype=torch.float32)
    infer(model, x)
    model.cuda()
    out = infer(model, x.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), fresh(model.cpu(), x), rtol=1e-4, atol=1e-4)


def test_a_replaced_parameter_dict(tiny_clip64):
    """A non-strict torch.export of a module that registers the model swaps its modules' _parameters dicts and
    leaves new ones behind: the key reads each module's dicts when it is computed, not the dicts it first saw."""
    model = build("maple", tiny_clip64)
    x = images()
    infer(model, x)
    for module in model.method.modules():
        if module._parameters:
            module._parameters = {name: torch.nn.Parameter(p.detach() + 0.1 * torch.randn_like(p))
                                  for name, p in module._parameters.items()}
    close(infer(model, x), fresh(model, x))


def test_holding_the_cache(tiny_clip64, monkeypatch):
    """holding_inference_cache: forwards inside take the entry built on entry without computing the key (a tracer's
    fake tensors have no address); outside, the key is checked again."""
    model = build("maple", tiny_clip64)
    x = images()
    with torch.no_grad(), model.holding_inference_cache() as entry:
        monkeypatch.setattr(model, "_cache_key", lambda full: pytest.fail("the key was computed while held"))
        held = model.predict(model(x))
        assert model.inference_cache() is entry
        with pytest.raises(RuntimeError, match="already active"):
            model.holding_inference_cache().__enter__()  # entering is what is refused
    monkeypatch.undo()
    close(held, fresh(model, x))
    perturb_(model.method)
    close(infer(model, x), fresh(model, x))  # the key is read again after the block
    model.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"model.eval\(\) and torch.no_grad\(\)"):
        model.holding_inference_cache().__enter__()
