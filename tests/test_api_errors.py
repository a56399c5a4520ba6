"""The Python API's answers to bad input (issue 10): each case raises one exception whose message names the
problem; and a patched CLIP survives pickle / torch.save as a patched model computing the same outputs."""

import copy
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fastprompt
from fastprompt.backbones import create_clip
from fastprompt.data import eval_transform
from fastprompt.fast import fast_path
from fastprompt.runner import Predictor
from fastprompt.runner import checkpoint as ckpt

TOKENS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 269, 49407] + [0] * 69,
                       [49406, 2368, 49407] + [0] * 74])


# --- class names -------------------------------------------------------------------------------------------


def test_classnames_none(tiny_clip):
    with pytest.raises(TypeError, match=r"^classnames is None; give a list of class names"):
        fastprompt.build("coop", tiny_clip, None)


def test_classnames_not_iterable(tiny_clip):
    with pytest.raises(TypeError, match=r"^classnames must be an iterable of strings, not int$"):
        fastprompt.build("coop", tiny_clip, 5)


def test_classnames_with_a_non_string_entry(tiny_clip):
    with pytest.raises(TypeError, match=r"^class name 1 is None of type NoneType, not a string$"):
        fastprompt.build("coop", tiny_clip, ["cat", None])


def test_classnames_generator_is_read_once_as_a_list(tiny_clip):
    # Class-specific context: the method's parameters are sized by the class count, read from the same list.
    from_generator = fastprompt.build("coop", tiny_clip, (n for n in ["cat", "red_panda", "dog"]), class_specific=True)
    from_list = fastprompt.build("coop", tiny_clip, ["cat", "red panda", "dog"], class_specific=True)
    assert from_generator.classnames == ("cat", "red panda", "dog")
    assert torch.equal(from_generator.prompts.tokens, from_list.prompts.tokens)
    shapes = [tuple(p.shape) for p in from_generator.trainable_parameters()]
    assert shapes == [tuple(p.shape) for p in from_list.trainable_parameters()] and shapes[0][0] == 3


def _duplicate_warnings(record) -> list:
    return [w for w in record if "duplicate class names" in str(w.message)]


def test_duplicate_class_names_are_named_in_a_warning(tiny_clip):
    # A warning, not an error: CLIP's standard ImageNet names hold duplicates ('missile', 'sunglasses'). One warning
    # per class list, at the caller's line (build checks the names, and the model tokenizes them: it used to be two).
    with pytest.warns(UserWarning, match=r"^duplicate class names \('cat' at positions 0 and 2\): their prompts are") \
            as record:
        model = fastprompt.build("coop", tiny_clip, ["cat", "dog", "cat"])
    assert model.classnames == ("cat", "dog", "cat")
    assert [w.filename for w in _duplicate_warnings(record)] == [__file__]
    with pytest.warns(UserWarning, match=r"^duplicate class names \('owl' at positions 0 and 1\)") as record:
        model.set_classnames(["owl", "owl"])
    assert [w.filename for w in _duplicate_warnings(record)] == [__file__]


def test_class_names_equal_after_cleaning_are_named(tiny_clip):
    with pytest.warns(UserWarning, match=r"'red_panda' and 'red  panda', both 'red panda' after cleaning at "
                                         r"positions 1 and 2"):
        fastprompt.build("maple", tiny_clip, ["cat", "red_panda", "red  panda"])


def test_names_that_differ_only_in_case_are_named(tiny_clip):
    """CLIP's tokenizer lower-cases: 'Crane' and 'crane' are one prompt."""
    with pytest.warns(UserWarning, match=r"'Crane' and 'crane', the same tokens at positions 0 and 2") as record:
        model = fastprompt.build("maple", tiny_clip, ["Crane", "heron", "crane"])
    assert torch.equal(model.prompts.tokens[0], model.prompts.tokens[2])
    assert [w.filename for w in _duplicate_warnings(record)] == [__file__]


def test_class_specific_contexts_do_not_warn_about_duplicate_names(tiny_clip, recwarn):
    """Each position has its own context there, so equal names do not give equal prompts."""
    fastprompt.build("coop", tiny_clip, ["cat", "cat"], class_specific=True)
    assert _duplicate_warnings(recwarn.list) == []


def test_imagenet_class_names_build_with_their_known_duplicates(tiny_clip):
    from open_clip import IMAGENET_CLASSNAMES

    with pytest.warns(UserWarning, match="'missile' at positions 657 and 744; 'sunglasses' at positions 836 and 837"):
        model = fastprompt.build("coop", tiny_clip, list(IMAGENET_CLASSNAMES))
    assert len(model.classnames) == 1000


def test_bad_method_name_and_method_object(tiny_clip):
    with pytest.raises(TypeError, match=r"^method name must be a string such as 'coop', not NoneType$"):
        fastprompt.build(None, tiny_clip, ["cat"])
    with pytest.raises(TypeError, match=r"^method must be a PromptMethod \(e.g. from fastprompt.build\), not str$"):
        fastprompt.PromptedCLIP(tiny_clip, "coop", ["cat"])


@pytest.mark.parametrize("method, option, value, expected", [
    ("maple", "n_ctx", "two", "str; expected int"),
    ("maple", "n_ctx", 2.0, "float; expected int"),
    ("maple", "depth", True, "bool; expected int"),
    ("maple", "ctx_init", 5, "int; expected str | None"),
    ("coop", "class_specific", 1, "int; expected bool"),
    ("mmrl", "alpha", "0.7", "str; expected float"),
    ("mpl", "n_first", 1.5, "float; expected int | None"),
])
def test_option_of_the_wrong_type_is_one_error_naming_it(tiny_clip, method, option, value, expected):
    with pytest.raises(TypeError, match=rf"^method '{method}' option {option}={value!r} is of type {expected} "
                                        r"\(default "):
        fastprompt.build(method, tiny_clip, ["cat", "dog"], **{option: value})


@pytest.mark.parametrize("method, option, value, message", [
    ("coop", "n_ctx", 0, "n_ctx must be >= 1, got 0"),  # was "text layer 1 has a token source but the schedule ..."
    ("maple", "depth", 0, "depth must be >= 1, got 0"),
    ("mmrl", "alpha", 1.5, "alpha must be >= 0 and <= 1, got 1.5"),
    ("mmrl", "reg_weight", float("inf"), "reg_weight must be a finite number, got inf"),
    ("promptsrc", "text_weight", np.float32(-1.0), "text_weight must be >= 0, got -1.0"),
])
def test_option_out_of_range_is_one_error_naming_it(tiny_clip, method, option, value, message):
    with pytest.raises(ValueError) as error:
        fastprompt.build(method, tiny_clip, ["cat", "dog"], **{option: value})
    assert str(error.value) == f"method {method!r} option {message}"


@pytest.mark.parametrize("method, option, value", [
    ("maple", "ctx_init", None),           # optional: no word initialisation
    ("mmrl", "alpha", 1),                  # an int is a number
    ("promptsrc", "text_weight", np.float32(20.0)),  # numpy scalars from a sweep
    ("coop", "n_ctx", np.int64(4)),
])
def test_option_of_a_compatible_type_is_accepted(tiny_clip, method, option, value):
    model = fastprompt.build(method, tiny_clip, ["cat", "dog"], **{option: value})
    assert model(torch.zeros(1, 3, 32, 32)).image_features.shape[0] == 1


def test_class_specific_prompts_refuse_another_class_count_and_warn_on_other_names(tiny_clip):
    model = fastprompt.build("coop", tiny_clip, ["cat", "dog"], class_specific=True)
    with pytest.raises(ValueError, match=r"^this model's prompts are class-specific \(one context for each of its 2"
                                         r" classes\): it cannot take 3 classes"):
        model.set_classnames(["cat", "dog", "owl"])
    with pytest.warns(UserWarning, match=r"^class-specific prompts follow position: the context trained for 'cat'"
                                         r" now scores 'dog'"):
        model.set_classnames(["dog", "cat"])
    generic = fastprompt.build("coop", tiny_clip, ["cat", "dog"])
    generic.set_classnames(["cat", "dog", "owl"])  # one context for every class: any class set
    assert generic(torch.zeros(1, 3, 32, 32)).logits["main"].shape == (1, 3)


# --- images --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["coop", "cocoop", "promptsrc"])
def test_empty_batch(tiny_clip, method):
    model = fastprompt.build(method, tiny_clip, ["cat", "dog"])
    with pytest.raises(ValueError, match=r"^the image batch is empty \(shape \(0, 3, 32, 32\)\)"):
        model(torch.zeros(0, 3, 32, 32))


def test_integer_images_to_the_model(tiny_clip):
    model = fastprompt.build("coop", tiny_clip, ["cat", "dog"])
    with pytest.raises(TypeError, match=r"floating-point tensor, got torch.uint8; integer pixels need the CLIP"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"^images must be a float tensor \[B, 3, H, W\], got list; torch.stack a list"):
        model([torch.zeros(3, 32, 32)])
    with pytest.raises(TypeError, match=r"^images must be a float tensor \[B, 3, H, W\], got Image; PIL images and"
                                        r" files go through fastprompt.data.eval_transform"):
        model(Image.new("RGB", (32, 32)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained CoOp checkpoint of the tiny backbone (the input checks do not depend on training)."""
    folder = tmp_path_factory.mktemp("ckpt")
    model = fastprompt.build("coop", create_clip("tiny", seed=2), ["cat", "dog"])
    ckpt.save_checkpoint(str(folder), model, "coop", {}, ckpt.backbone_record(model, "tiny", None))
    return str(folder)


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor(checkpoint, clip=create_clip("tiny", seed=2))


def test_predict_refuses_integer_tensors(predictor):
    # Before: uint8 was cast to float and classified unnormalised (a uniform 0.5/0.5 here), without an error.
    for dtype in (torch.uint8, torch.int64):
        with pytest.raises(TypeError, match=rf"^images is a {dtype} tensor; a tensor must be float, already"
                                            r" normalised with the CLIP statistics"):
            predictor(torch.zeros(2, 3, 32, 32, dtype=dtype))


def test_predict_normalises_pil_images_like_the_documented_tensor_path(predictor):
    # The path that does normalise: a PIL image gives what its eval_transform tensor gives.
    pixels = torch.randint(0, 256, (40, 46, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    image = Image.fromarray(pixels.numpy())
    tensor = eval_transform(32)(image).unsqueeze(0)
    assert torch.equal(predictor(image), predictor(tensor))
    assert torch.equal(predictor(tensor[0]), predictor(tensor))  # one [3, H, W] image


def test_predict_empty_inputs(predictor):
    with pytest.raises(ValueError, match=r"^the image batch is empty \(shape \(0, 3, 32, 32\)\)"):
        predictor(torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match=r"^no images given: the list of images is empty$"):
        predictor([])


def test_predict_wrong_kinds_of_input(predictor):
    with pytest.raises(TypeError, match=r"^images must be file paths, PIL images or a float tensor, not int$"):
        predictor(3)
    with pytest.raises(TypeError, match=r"^image 1 is of type Tensor; a list holds file paths or PIL images"):
        predictor([Image.new("RGB", (32, 32)), torch.zeros(3, 32, 32)])
    with pytest.raises(ValueError, match=r"^images must have shape \[B, 3, H, W\] or \[3, H, W\], got \(32, 32\)$"):
        predictor(torch.zeros(32, 32))


@pytest.mark.parametrize("device, message", [
    ("tpu", "device='tpu' is not a device name (auto, cpu, cuda, cuda:N)"),
    ("cuda:99", "device='cuda:99' but "),  # no CUDA here, or fewer than 100 GPUs: either is named
])
def test_predictor_on_a_device_this_machine_lacks(checkpoint, device, message):
    with pytest.raises(ValueError) as error:
        Predictor(checkpoint, ["owl", "dog"], device=device)
    assert str(error.value).startswith(message), error.value


def test_predictor_duplicate_class_names(checkpoint):
    with pytest.warns(UserWarning, match="duplicate class names \\('dog' at positions 1 and 2\\)") as record:
        Predictor(checkpoint, ["owl", "dog", "dog"], clip=create_clip("tiny", seed=2))
    assert [w.filename for w in _duplicate_warnings(record)] == [__file__]


# --- freezing ------------------------------------------------------------------------------------------------


def test_build_freezes_the_callers_clip_as_documented():
    clip = create_clip("tiny", seed=3)
    assert all(p.requires_grad for p in clip.parameters())
    model = fastprompt.build("coop", clip, ["cat", "dog"])
    assert model.clip is clip and not any(p.requires_grad for p in clip.parameters())
    clip_ids = {id(p) for p in clip.parameters()}
    assert model.trainable_parameters() and not clip_ids & {id(p) for p in model.trainable_parameters()}
    assert "requires_grad=False" in fastprompt.build.__doc__ and "clip.requires_grad_(True)" in fastprompt.build.__doc__


# --- unpatch ---------------------------------------------------------------------------------------------------


def test_unpatch_of_something_that_is_not_a_clip(tiny_clip):
    with pytest.raises(fastprompt.UnsupportedModelError, match=r"^unpatch: Linear has no visual.transformer.resblocks;"
                                                                r" it is not an open_clip CLIP"):
        fastprompt.unpatch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"^unpatch takes an open_clip CLIP module, not NoneType$"):
        fastprompt.unpatch(None)
    model = fastprompt.build("coop", tiny_clip, ["cat"])
    with pytest.raises(TypeError, match=r"not the PromptedCLIP on it: pass model.clip$"):
        fastprompt.unpatch(model)
    assert fastprompt.unpatch(tiny_clip) is tiny_clip and not fastprompt.is_patched(tiny_clip)  # unpatched: no-op


def test_patch_of_a_built_model_names_its_clip_and_patching_after_build_is_exact(tiny_clip):
    model = fastprompt.build("maple", tiny_clip, ["cat", "red panda", "dog"]).eval()
    with pytest.raises(TypeError, match=r"^patch takes the open_clip CLIP, not the PromptedCLIP built on it: pass "
                                        r"model.clip \(before or after build"):
        fastprompt.patch(model)
    assert not fastprompt.is_patched(tiny_clip)  # nothing changed
    images = torch.randn(2, 3, *model.info.image_size, generator=torch.Generator().manual_seed(0))
    try:  # the CLIP is the session's: unpatched again whatever happens
        with torch.no_grad():
            unpatched = model.predict(model(images))
            fastprompt.patch(model.clip)
            patched = model.predict(model(images))
        assert fastprompt.is_patched(tiny_clip)
        torch.testing.assert_close(patched, unpatched, rtol=1e-4, atol=1e-4)
    finally:
        fastprompt.unpatch(tiny_clip)


# --- pickling a patched CLIP ---------------------------------------------------------------------------------------


def _outputs(clip, images):
    with torch.no_grad():
        return clip.encode_image(images), clip.encode_text(TOKENS)


def _check_loaded(loaded, patched, images):
    assert fastprompt.is_patched(loaded)
    assert fast_path(loaded).kernels == fast_path(patched).kernels
    assert type(loaded.transformer.resblocks[0]) is type(patched.transformer.resblocks[0])
    for got, want in zip(_outputs(loaded, images), _outputs(patched, images)):
        assert torch.equal(got, want)


def test_patched_clip_pickles_and_torch_saves():
    images = torch.randn(2, 3, 32, 32)
    never_patched = create_clip("tiny", seed=4)
    patched = fastprompt.patch(create_clip("tiny", seed=4))
    _outputs(patched, images)
    # A text block called with open_clip's mask caches whether it is causal: that cache must not travel.
    patched.transformer.resblocks[0](torch.randn(2, 77, 64), attn_mask=patched.attn_mask)
    assert "_fastprompt_mask_cache" in patched.transformer.resblocks[0].__dict__

    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    for loaded in (pickle.loads(pickle.dumps(patched)), torch.load(buffer, weights_only=False),
                   copy.deepcopy(patched)):
        assert "_fastprompt_mask_cache" not in loaded.transformer.resblocks[0].__dict__
        _check_loaded(loaded, patched, images)
        fastprompt.unpatch(loaded)
        assert not fastprompt.is_patched(loaded) and "encode_text" not in loaded.__dict__
        assert type(loaded.transformer.resblocks[0]) is type(never_patched.transformer.resblocks[0])
        for got, want in zip(_outputs(loaded, images), _outputs(never_patched, images)):
            assert torch.equal(got, want)  # unpatched after loading: bit-identical to a never-patched model
    assert fastprompt.is_patched(patched)  # saving changed nothing on the original


def test_prompted_model_on_a_loaded_patched_clip_matches():
    images = torch.randn(2, 3, 32, 32)
    patched = fastprompt.patch(create_clip("tiny", seed=5))
    loaded = pickle.loads(pickle.dumps(patched))
    torch.manual_seed(0)
    a = fastprompt.build("maple", patched, ["cat", "dog"]).eval()
    torch.manual_seed(0)
    b = fastprompt.build("maple", loaded, ["cat", "dog"]).eval()
    assert b.uses_packed_text()
    with torch.no_grad():
        assert torch.equal(a(images).logits["main"], b(images).logits["main"])


def test_torch_save_loads_patched_in_a_fresh_process(tmp_path):
    # A fresh interpreter has never made the fast block class: loading must make it.
    images = torch.randn(2, 3, 32, 32)
    patched = fastprompt.patch(create_clip("tiny", seed=6))
    torch.save({"model": patched, "images": images, "expected": _outputs(patched, images)}, tmp_path / "m.pt")
    # The same thread count as here: CPU GEMMs on a few rows (the pooled last block's) may split their reduction
    # across threads, so bit-identical outputs need the same threads.
    script = f"""
import torch, fastprompt
torch.set_num_threads({torch.get_num_threads()})
saved = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)
model = saved["model"]
assert fastprompt.is_patched(model), "not patched after loading"
assert type(model.visual.transformer.resblocks[0]).__name__ == "FastResidualAttentionBlock"
with torch.no_grad():
    got = (model.encode_image(saved["images"]), model.encode_text(torch.tensor({TOKENS.tolist()!r})))
assert all(torch.equal(g, e) for g, e in zip(got, saved["expected"])), "outputs differ"
fastprompt.unpatch(model)
assert not fastprompt.is_patched(model)
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_predictor_class_names_not_a_list(checkpoint):
    with pytest.raises(TypeError, match=r"^classnames must be an iterable of strings, not int$"):
        Predictor(checkpoint, 7, clip=create_clip("tiny", seed=2))
    predictor = Predictor(checkpoint, (n for n in ["owl", "cat"]), clip=create_clip("tiny", seed=2))
    assert predictor.classnames == ["owl", "cat"] and predictor.mode == "novel"
