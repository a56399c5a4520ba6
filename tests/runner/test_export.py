"""`fastprompt export`: a text-prompt method as one matrix over plain CLIP image features. The reference is
open_clip's own, unpatched `encode_image` and the Predictor's probabilities for the same checkpoint and classes."""

import json

import pytest
import torch
from runner_support import FAST, PROCEDURAL, write_image
from safetensors import safe_open
from safetensors.torch import load_file

from fastprompt.runner import Predictor

ARGS = ["--shots", "2", "--seeds", "1", *FAST, *PROCEDURAL, "epochs=2", "batch_size=4"]


def photos(tmp_path, size, count=5):
    """`count` image files of different sizes and colours, and the batch the evaluation transform makes of them."""
    from fastprompt.data import eval_transform, open_rgb_image

    files = [write_image(tmp_path / "photos" / f"{k}.jpg", (40 * k, 200 - 30 * k, 90), seed=k, size=50 + 7 * k)
             for k in range(count)]
    return files, torch.stack([eval_transform(size)(open_rgb_image(f)) for f in files])


def trained(tmp_path, cli, method):
    run = tmp_path / method
    code, _, err = cli("train", "--method", method, *ARGS, f"output_dir={run}")
    assert code == 0, err
    return run / "seed1"


@pytest.mark.parametrize("method", ["coop", "deep_language"])
@pytest.mark.parametrize("new_classes", [False, True])
def test_the_matrix_gives_the_methods_predictions_with_plain_open_clip(tmp_path, cli, method, new_classes):
    checkpoint = trained(tmp_path, cli, method)
    args = ["export", checkpoint, "--output", tmp_path / "classifier.safetensors"]
    names = None
    if new_classes:  # the novel-class use: the same prompts over another class set
        names = ["violet ring", "white cross", "black dot"]
        (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
        args += ["--classnames", tmp_path / "names.txt"]
    code, out, err = cli(*args)
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'classifier.safetensors'}: {method} classifier over")

    exported = load_file(str(tmp_path / "classifier.safetensors"))
    with safe_open(str(tmp_path / "classifier.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    predictor = Predictor(str(checkpoint), names, device="cpu", amp_dtype=None, kernels="eager")
    assert json.loads(metadata["classnames"]) == list(predictor.classnames)
    assert metadata["method"] == method and metadata["format"] == "fastprompt.classifier/1"
    features = exported["text_features"]
    assert features.shape[0] == len(predictor.classnames)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(features.shape[0]))

    images = torch.randn(6, 3, predictor.image_size, predictor.image_size, generator=torch.Generator().manual_seed(3))
    clip = predictor.model.clip  # the frozen open_clip model, unpatched (kernels='eager')
    with torch.no_grad():
        image_features = torch.nn.functional.normalize(clip.encode_image(images), dim=-1)
    probabilities = (exported["logit_scale"] * image_features @ features.T).softmax(-1)
    torch.testing.assert_close(probabilities, predictor(images), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, why", [
    ("maple", "it prompts the image tower too"),
    ("cocoop", "its text prompts depend on each image"),
    ("mmrl", "it prompts the image tower too"),
])
def test_methods_without_a_fixed_classifier_are_refused(tmp_path, cli, method, why):
    checkpoint = trained(tmp_path, cli, method)
    code, _, err = cli("export", checkpoint, "--output", tmp_path / "classifier.safetensors")
    assert code == 2
    assert err.startswith(f"fastprompt: error: {method} cannot be exported as a fixed classifier: {why}")
    assert ".pt2" in err and "fastprompt predict" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "classifier.safetensors").exists()


# --- .pt2: every method as a torch.export program ----------------------------------------------------------------
@pytest.mark.parametrize("method, new_classes", [("maple", False), ("cocoop", False), ("mmrl", True), ("coop", True)])
def test_the_program_gives_the_predictors_probabilities_without_fastprompt(tmp_path, cli, method, new_classes):
    """The file the CLI writes, loaded by torch alone, against the Predictor of the same checkpoint and classes (the
    image files through the evaluation transform the file describes)."""
    from fastprompt.runner.export import read_program

    checkpoint = trained(tmp_path, cli, method)
    output = tmp_path / "model.pt2"
    args = ["export", checkpoint, "--output", output]
    names = None
    if new_classes:  # MMRL: novel mode on another class set
        names = ["violet ring", "white cross", "black dot"]
        (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
        args += ["--classnames", tmp_path / "names.txt"]
    code, out, err = cli(*args)
    assert code == 0, err
    assert out.startswith(f"wrote {output}: {method} ({'novel' if new_classes else 'base'} mode) as a torch.export"
                          " program over")

    predictor = Predictor(str(checkpoint), names, device="cpu", amp_dtype=None, kernels="eager")
    program, description = read_program(str(output))
    assert description["format"] == "fastprompt.program/1" and description["method"] == method
    assert description["classnames"] == list(predictor.classnames) and description["mode"] == predictor.mode
    size = description["input"]["shape"][2]
    assert size == predictor.image_size
    files, images = photos(tmp_path, size)
    with torch.no_grad():
        probabilities = program.module()(images).softmax(-1)
    torch.testing.assert_close(probabilities, predictor(files), rtol=1e-5, atol=1e-6)


def test_an_unknown_suffix_is_one_error(tmp_path, cli):
    checkpoint = trained(tmp_path, cli, "coop")
    code, _, err = cli("export", checkpoint, "--output", tmp_path / "model.txt")
    assert code == 2
    assert err.startswith(f"fastprompt: error: --output {tmp_path / 'model.txt'}: the suffix says what to write: .pt2")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "model.txt").exists()


def test_read_program_refuses_a_program_without_the_description(tmp_path):
    from fastprompt.runner.export import ExportError, read_program

    class Double(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    torch.export.save(torch.export.export(Double(), (torch.ones(2),)), str(tmp_path / "other.pt2"))
    with pytest.raises(ExportError, match="without fastprompt's description"):
        read_program(str(tmp_path / "other.pt2"))


# --- .onnx: the program in ONNX, run by onnxruntime -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["maple", "cocoop"])
def test_the_onnx_model_gives_the_predictors_probabilities_in_onnxruntime(tmp_path, cli, method):
    onnxruntime = pytest.importorskip("onnxruntime")  # in the test extra: CI has it

    checkpoint = trained(tmp_path, cli, method)
    output = tmp_path / "model.onnx"
    code, out, err = cli("export", checkpoint, "--output", output)
    assert code == 0, err
    assert out.startswith(f"wrote {output}: {method} (base mode) as an ONNX model over")

    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (given,), (taken,) = session.get_inputs(), session.get_outputs()
    assert given.name == "images" and given.shape[0] == "batch" and taken.name == "logits"
    description = json.loads(session.get_modelmeta().custom_metadata_map["fastprompt.json"])
    predictor = Predictor(str(checkpoint), None, device="cpu", amp_dtype=None, kernels="eager")
    assert description["format"] == "fastprompt.onnx/1" and description["classnames"] == list(predictor.classnames)
    files, images = photos(tmp_path, description["input"]["shape"][2])
    expected = predictor(files)
    for rows in (slice(0, 1), slice(0, 5)):  # the batch dimension is dynamic
        logits = torch.from_numpy(session.run(None, {"images": images[rows].numpy()})[0])
        torch.testing.assert_close(logits.softmax(-1), expected[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_onnx_without_its_packages_is_one_error(tmp_path, cli, monkeypatch, missing):
    import sys

    checkpoint = trained(tmp_path, cli, "coop")
    monkeypatch.setitem(sys.modules, missing, None)  # an import of it fails as if it were not installed
    code, _, err = cli("export", checkpoint, "--output", tmp_path / "model.onnx")
    assert code == 2
    assert err.startswith(f"fastprompt: error: --output {tmp_path / 'model.onnx'}: writing ONNX needs the onnx,"
                          f" onnxscript and onnxruntime packages ({missing} is missing): pip install 'fastprompt[onnx]'")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "model.onnx").exists()


def test_an_onnx_model_over_protobufs_limit_is_one_error(tmp_path, cli, monkeypatch):
    """One ONNX file holds its weights in one protobuf message, at most 2 GB (ViT-bigG's image tower is over it):
    the refusal names the .pt2 program instead. Serialisation is made to fail as protobuf's own limit does."""
    pytest.importorskip("onnxruntime")
    from google.protobuf.message import EncodeError
    from onnx import ModelProto

    checkpoint = trained(tmp_path, cli, "coop")

    def too_large(self):
        raise EncodeError("Failed to serialize proto")

    monkeypatch.setattr(ModelProto, "SerializeToString", too_large)
    code, _, err = cli("export", checkpoint, "--output", tmp_path / "model.onnx")
    assert code == 2
    assert err.startswith(f"fastprompt: error: --output {tmp_path / 'model.onnx'}: the ONNX model is too large for one"
                          " file (Failed to serialize proto); write a .pt2 program instead")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "model.onnx").exists()


# --- --dtype: half-precision programs -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_program_computes_in_its_dtype_and_gives_the_float32_predictions(tmp_path, cli, dtype):
    """--dtype bfloat16 / float16: the program's matmul weights are stored in that dtype (a smaller file), it takes
    images in that dtype, and its probabilities are the float32 Predictor's to half precision (the probabilities of
    this tiny model lie within 0.1 of uniform, so 6e-3 is a tenth of that spread)."""
    from fastprompt.runner.export import read_program

    checkpoint = trained(tmp_path, cli, "maple")
    name = str(dtype).removeprefix("torch.")
    code, out, err = cli("export", checkpoint, "--output", tmp_path / "half.pt2", "--dtype", name)
    assert code == 0, err
    assert f"), {name} images [batch, 3," in out
    assert cli("export", checkpoint, "--output", tmp_path / "full.pt2")[0] == 0
    assert (tmp_path / "half.pt2").stat().st_size < 0.8 * (tmp_path / "full.pt2").stat().st_size

    program, description = read_program(str(tmp_path / "half.pt2"))
    assert description["input"]["dtype"] == name
    stored = {**program.state_dict, **program.constants}
    matrices = [value for value in stored.values() if isinstance(value, torch.Tensor) and value.dim() == 2
                and value.numel() >= 64 * 64]
    assert matrices and all(value.dtype == dtype for value in matrices)
    files, images = photos(tmp_path, description["input"]["shape"][2], count=4)
    with torch.no_grad():
        logits = program.module()(images.to(dtype))
    assert logits.dtype == torch.float32
    expected = Predictor(str(checkpoint), None, device="cpu", amp_dtype=None, kernels="eager")(files)
    torch.testing.assert_close(logits.softmax(-1), expected, rtol=0, atol=6e-3)


def test_a_float16_onnx_model_runs_in_onnxruntime(tmp_path, cli):
    onnxruntime = pytest.importorskip("onnxruntime")
    checkpoint = trained(tmp_path, cli, "maple")
    output = tmp_path / "half.onnx"
    # fp16: the runner's precision= name for float16, taken too
    code, out, err = cli("export", checkpoint, "--output", output, "--dtype", "fp16")
    assert code == 0, err
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)" and session.get_outputs()[0].type == "tensor(float)"
    description = json.loads(session.get_modelmeta().custom_metadata_map["fastprompt.json"])
    assert description["input"]["dtype"] == "float16"
    files, images = photos(tmp_path, description["input"]["shape"][2], count=4)
    logits = torch.from_numpy(session.run(None, {"images": images.half().numpy()})[0])
    expected = Predictor(str(checkpoint), None, device="cpu", amp_dtype=None, kernels="eager")(files)
    torch.testing.assert_close(logits.softmax(-1), expected, rtol=0, atol=6e-3)


def test_dtypes_a_format_cannot_hold_are_one_error(tmp_path, cli):
    """bfloat16 ONNX (onnxruntime, the check, has no bfloat16 convolution) and a half-precision fixed classifier are
    refused before anything is built or written."""
    checkpoint = trained(tmp_path, cli, "coop")
    for output, dtype, says in [("m.onnx", "bfloat16", "ONNX takes float32 or float16 here"),
                                ("m.onnx", "bf16", "ONNX takes float32 or float16 here"),
                                ("m.safetensors", "float16", "a fixed classifier is written in float32")]:
        code, _, err = cli("export", checkpoint, "--output", tmp_path / output, "--dtype", dtype)
        assert code == 2
        assert err.startswith(f"fastprompt: error: --output {tmp_path / output}: {says}")
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / output).exists()
    code, _, err = cli("export", checkpoint, "--output", tmp_path / "m.pt2", "--dtype", "int8")
    assert code == 2 and "argument --dtype: invalid choice: 'int8' (choose from " in err, err
