"""fastprompt.export.export_program: a trained model as a torch.export program. The reference for its logits is an
independent twin of the model (built anew, the prompts copied in, computed with gradients on, so without any
cached text) in float64, where a re-ordered graph and a wrong constant are told apart (1e-10 against ~1e-2)."""

import io

import pytest
import torch
from test_text_cache import METHODS, NAMES, build, fresh, images, perturb_

import fastprompt
from fastprompt.export import ClassLogits, export_program


_EXPORTED = {}  # (method, clip) -> (model, program): an export takes seconds; tests that only read share them


def exported(method, clip, shared=True):
    key = (method, id(clip))
    if shared and key in _EXPORTED:
        return _EXPORTED[key]
    model = build(method, clip)
    perturb_(model.method)  # trained-looking prompts: zero-initialised ones would hide a dropped prompt
    result = model, export_program(model)
    if shared:
        _EXPORTED[key] = result
    return result


def round_trip(program):
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("method", METHODS)
def test_the_program_gives_a_fresh_models_logits_at_any_batch_size(method, tiny_clip64):
    model, program = exported(method, tiny_clip64)
    loaded = round_trip(program).module()
    for n in (1, 2, 5):  # traced at 3: the batch dimension is not fixed by the trace
        x = images(n)
        expected = fresh(model, x)
        with torch.no_grad():
            close(program.module()(x), expected)
            close(loaded(x), expected)


def test_novel_mode(tiny_clip64):
    """MMRL's decoupled inference: the novel-class logits use the frozen-feature branch only."""
    model = build("mmrl", tiny_clip64)
    perturb_(model.method)
    model.set_classnames(["cyan ring", "orange hexagon", "white moon"])
    program = export_program(model, mode="novel")
    x = images(4)
    twin = fastprompt.build("mmrl", tiny_clip64, list(model.classnames)).double().eval()
    twin.method.load_state_dict(model.method.state_dict())
    with torch.enable_grad():
        expected = twin.predict(twin(x), "novel").detach()
        base = twin.predict(twin(x), "base").detach()
    assert (expected - base).abs().max() > 1e-3  # the two modes differ: the test tells them apart
    with torch.no_grad():
        close(program.module()(x), expected)


def _tensor_count(program) -> int:
    tensors = list(program.state_dict.values()) + [t for t in program.constants.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() for t in tensors)


@pytest.mark.parametrize("method, keeps_text_tower", [("coop", False), ("maple", False), ("vpt_deep", False),
                                                      ("cocoop", True)])
def test_only_the_weights_the_forward_reads_are_in_the_program(method, keeps_text_tower, tiny_clip64):
    model, program = exported(method, tiny_clip64)
    visual = sum(p.numel() for p in tiny_clip64.visual.parameters())
    text_blocks = sum(p.numel() for p in tiny_clip64.transformer.parameters())
    prompts = sum(p.numel() for p in model.method.parameters())
    count = _tensor_count(program)
    if keeps_text_tower:  # CoCoOp's text depends on each image: its text tower runs in the program
        assert count > visual + text_blocks
    else:  # the class set's text features are a constant [C, E]; the text tower is not carried
        assert visual <= count < visual + prompts + text_blocks // 4


def test_the_model_stays_usable_and_its_cache_sees_later_changes(tiny_clip64):
    model, _ = exported("maple", tiny_clip64, shared=False)  # changed below
    x = images(3)
    with torch.no_grad():
        close(model.predict(model(x)), fresh(model, x))
        perturb_(model.method)  # after the export: the cached text must not be the program's
        close(model.predict(model(x)), fresh(model, x))


def test_refusals(tiny_clip64, tiny_clip):
    import copy

    with pytest.raises(ValueError, match="expected a fastprompt model"):
        export_program(tiny_clip64)
    model = build("coop", tiny_clip64)
    with pytest.raises(ValueError, match="probe_batch must be at least 2"):
        export_program(model, probe_batch=1)
    with pytest.raises(ValueError, match="mode must be 'base' or 'novel'"):
        ClassLogits(model, mode="all")
    patched = copy.deepcopy(tiny_clip)
    fastprompt.patch(patched, backend="sdpa")
    with pytest.raises(ValueError, match=r"its CLIP is patched \(fastprompt.patch\)"):
        export_program(fastprompt.build("coop", patched, NAMES))


def test_a_program_refuses_another_image_size_or_dtype(tiny_clip64):
    _, program = exported("coop", tiny_clip64)
    run = program.module()
    with torch.no_grad():
        run(images(2))  # the traced size and dtype
        with pytest.raises(Exception, match="32"):
            run(torch.randn(2, 3, 32, 31, dtype=torch.float64))
        with pytest.raises(Exception, match="(?i)dtype"):
            run(images(2, dtype=torch.float32))


def test_a_users_own_export_of_a_module_that_registers_the_model(tiny_clip64):
    """torch.export of the user's own wrapper (the model registered as a child, so its weights are the program's
    parameters) inside holding_inference_cache; afterwards the model still serves fresh logits."""

    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.predict(self.model(x))

    model = build("maple", tiny_clip64)
    perturb_(model.method)
    x = images(3)
    with torch.no_grad(), model.holding_inference_cache():
        program = torch.export.export(Wrapper(model), (x,), strict=False)
    with torch.no_grad():
        close(program.module()(x), fresh(model, x))
        perturb_(model.method)
        close(model.predict(model(x)), fresh(model, x))


@pytest.mark.parametrize("method", ["maple", "cocoop"])
def test_every_constant_moves_with_the_program(method, tiny_clip64):
    """torch.export.passes.move_to_device_pass carries the program to another device (the meta device stands in for
    a GPU here): a constant left on the CPU would stop the forward with a device mismatch."""
    import torch.export.passes

    _, program = exported(method, tiny_clip64)
    moved = torch.export.passes.move_to_device_pass(round_trip(program), "meta")
    with torch.no_grad():
        out = moved.module()(images(4).to("meta"))
    assert out.device.type == "meta" and out.shape == (4, len(NAMES))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["maple", "cocoop"])
def test_the_program_on_a_gpu(method, tiny_clip):
    """The CPU-exported float32 program moved to the GPU gives the CPU program's logits (to the GPU's float32
    arithmetic: cuDNN's convolution may take TF32)."""
    import torch.export.passes

    model = fastprompt.build(method, tiny_clip, NAMES).eval()
    perturb_(model.method)
    program = export_program(model)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = program.module()(x)
        moved = torch.export.passes.move_to_device_pass(round_trip(program), "cuda")
        got = moved.module()(x.cuda()).cpu()
    torch.testing.assert_close(got.softmax(-1), expected.softmax(-1), rtol=0, atol=2e-3)


def test_a_bf16_model_gives_a_bf16_program(tiny_clip):
    """A CLIP in bf16 (as on a GPU) exports a program computing in bf16 without autocast: its logits are the bf16
    model's to a few bf16 ulps, and the float32 model's to bf16 precision."""
    import copy

    model32 = fastprompt.build("maple", tiny_clip, NAMES).eval()
    perturb_(model32.method)
    model16 = fastprompt.build("maple", copy.deepcopy(tiny_clip).to(torch.bfloat16), NAMES).eval()
    model16.method.load_state_dict(model32.method.state_dict())
    program = export_program(model16)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got = program.module()(x.to(torch.bfloat16))
        reference = model32.predict(model32(x))
    assert got.dtype == torch.float32  # the logits come out in float32 whatever the compute dtype
    torch.testing.assert_close(got.softmax(-1), reference.softmax(-1), rtol=0, atol=0.05)


@pytest.mark.gpu
def test_a_bf16_model_on_the_gpu_exports_there(tiny_clip):
    """Exported where the model lives: a bf16 CLIP on CUDA gives a CUDA bf16 program, its logits the model's."""
    import copy

    model = fastprompt.build("maple", copy.deepcopy(tiny_clip).to("cuda", torch.bfloat16), NAMES).eval()
    perturb_(model.method)
    program = export_program(model)
    x = torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = program.module()(x)
        expected = model.predict(model(x)).float()
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.softmax(-1), expected.softmax(-1), rtol=0, atol=0.02)


def test_a_model_in_training_mode_is_left_training(tiny_clip64):
    """Exported between epochs: traced in eval mode (the logits are the eval forward's), left training."""
    model = build("vpt_deep", tiny_clip64)
    perturb_(model.method)
    model.train()
    program = export_program(model)
    assert model.training and model.method.training
    x = images(2)
    with torch.no_grad():
        close(program.module()(x), fresh(model, x))
