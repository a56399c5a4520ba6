"""A trained checkpoint for use without fastprompt: a program (.pt2), the program in ONNX (.onnx), or a fixed
classifier (.safetensors).

Program (`--output x.pt2`, every method): the model's evaluation forward as a torch.export program
(fastprompt.export.export_program), images normalised as in evaluation -> class logits, any batch size; float32, or
`--dtype bfloat16` / `float16` (the CLIP's weights, the computation and the input; the logits stay float32).

    fastprompt export runs/maple-b2n-dtd-16shot/seed1 --output dtd-maple.pt2 [--classnames new.txt]
    program = torch.export.load("dtd-maple.pt2").module(); logits = program(images)

The file also holds `fastprompt.json` (torch.export's extra files): the class names, mode, method, image size and
the evaluation transform that makes its input; `read_program` returns both.

ONNX (`--output x.onnx`, every method; needs `pip install 'fastprompt[onnx]'`): that program converted by torch's
ONNX exporter, input `images` [batch, 3, S, S] -> output `logits`, the same description in the model's metadata
(`fastprompt.json`), checked in onnxruntime against the program before it is written.

    session = onnxruntime.InferenceSession("dtd-maple.onnx"); logits, = session.run(None, {"images": x})

Fixed classifier (`--output x.safetensors`, text-prompt methods only):

Where a method prompts only the text tower and its text does not depend on the image (CoOp, deep language
prompting, zero-shot CLIP), its predictions are `logit_scale * normalize(clip.encode_image(x)) @ W.T` with W the
class set's normalised text features, computed once. Exported, W needs neither fastprompt nor the prompts at
inference: an unmodified open_clip model and one matrix product, at the image tower's own cost.

    fastprompt export runs/coop-b2n-dtd-16shot/seed1 --output dtd-coop.safetensors [--classnames new.txt]

The file (safetensors) holds `text_features` [C, E] (float32, unit rows) and `logit_scale` (float32, exp'd), and
its metadata the class names (JSON), method, backbone name and weights, and where it came from. Methods that prompt
the image tower or condition the text on the image are refused: no fixed matrix gives their predictions. Before
writing, the matrix is checked against the model itself on a probe batch.
"""

from __future__ import annotations

import io
import json
import os

import torch

from ..method import PromptMethod
from . import checkpoint as ckpt

CLASSIFIER_FORMAT = "fastprompt.classifier/1"
PROGRAM_FORMAT = "fastprompt.program/1"
ONNX_FORMAT = "fastprompt.onnx/1"
PROGRAM_METADATA = "fastprompt.json"  # its entry among the .pt2 file's extra files
# --dtype of a program: its CLIP weights, its computation and its input in that dtype (the half types halve the file
# and run at half precision on a GPU); the logits are float32 in every case.
PROGRAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """The checkpoint's method has no fixed-classifier form; the message says why and what to use instead."""


def fixed_classifier_problem(model) -> str | None:
    """Why `model`'s predictions are not a fixed classifier over plain CLIP image features (None when they are)."""
    method = model.method
    if method.vision_schedule.prompted or len(method.vision_sources):
        return "it prompts the image tower too, so its image features are not plain CLIP's"
    if method.per_image_text():
        return "its text prompts depend on each image, so its class features change with the image"
    if type(method).heads is not PromptMethod.heads or type(method).predict is not PromptMethod.predict:
        return "its logits are not one cosine product of image and class features"
    return None


def export_classifier(checkpoint: str, output: str, classnames=None, pretrained: str | None = None) -> dict:
    """Write `checkpoint`'s classifier for `classnames` (default: its training classes) to `output`; returns the
    metadata written. fp32 on the CPU: the matrix is computed once, exactly."""
    from safetensors.torch import save

    from .predict import Predictor

    predictor = Predictor(checkpoint, classnames, device="cpu", pretrained=pretrained, amp_dtype=None,
                          kernels="eager")
    model, manifest = predictor.model, predictor.manifest
    problem = fixed_classifier_problem(model)
    if problem is not None:
        raise ExportError(f"{manifest['method']} cannot be exported as a fixed classifier: {problem}; export it as a"
                          " program (--output with .pt2), or use `fastprompt predict` or fastprompt.runner.Predictor")
    with torch.no_grad():
        text_features = torch.nn.functional.normalize(model.inference_cache().text[0].float(), dim=-1)
        logit_scale = model.clip.logit_scale.exp().float()
    _check_against_the_model(predictor, text_features, logit_scale)
    backbone = manifest["backbone"]
    metadata = {"format": CLASSIFIER_FORMAT, "method": manifest["method"], "classnames": json.dumps(
        list(predictor.classnames)), "backbone": backbone["name"],
        "pretrained": _weights_label(pretrained, backbone),
        "checkpoint": predictor.checkpoint,
        "usage": _open_clip_call(backbone["name"], _weights_label(pretrained, backbone))
        + "logits = logit_scale * normalize(clip.encode_image(images)) @ text_features.T"}
    tensors = {"text_features": text_features.contiguous(), "logit_scale": logit_scale.reshape(())}
    ckpt.atomic_write_bytes(output, save(tensors, metadata=metadata))
    return metadata


def _check_against_the_model(predictor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> None:
    """The exported product must give the model's own logits (a probe batch of random images)."""
    generator = torch.Generator().manual_seed(0)
    size = predictor.image_size
    images = torch.randn(4, 3, size, size, generator=generator)
    with torch.no_grad():
        expected = predictor.model.predict(predictor.model(images), predictor.mode).float()
        image_features = torch.nn.functional.normalize(predictor.model.clip.encode_image(images).float(), dim=-1)
        got = logit_scale * image_features @ text_features.T
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-3):
        raise ExportError(f"the fixed classifier does not reproduce {predictor.manifest['method']}'s logits"
                          f" (largest difference {(got - expected).abs().max().item():.3g}); not written")


def export_file(checkpoint: str, output: str, classnames=None, pretrained: str | None = None,
                dtype: str = "float32") -> dict:
    """Export `checkpoint` to `output` in the form its suffix names: .pt2 a program (every method), .onnx that program
    in ONNX, .safetensors a fixed classifier (text-prompt methods). `dtype` is a program's weights, compute and input
    dtype (PROGRAM_DTYPES). Returns the metadata written."""
    if dtype not in PROGRAM_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(PROGRAM_DTYPES)}, got {dtype!r}")
    suffix = os.path.splitext(output)[1].lower()
    if suffix == ".pt2":
        return export_program_file(checkpoint, output, classnames, pretrained, dtype)
    if suffix == ".onnx":
        if dtype == "bfloat16":
            # Checked before the model is built: the exporter writes it, but onnxruntime (which checks every ONNX
            # file before it is written) has no bfloat16 kernel for Conv and others, so nothing could vouch for it.
            raise ExportError(f"--output {output}: ONNX takes float32 or float16 here (onnxruntime, which checks the"
                              " model before it is written, runs no bfloat16 convolution); --dtype bfloat16 writes a"
                              " .pt2 program")
        return export_onnx_file(checkpoint, output, classnames, pretrained, dtype)
    if suffix == ".safetensors":
        if dtype != "float32":
            raise ExportError(f"--output {output}: a fixed classifier is written in float32 (one [C, E] matrix; cast"
                              f" it where it is used); --dtype {dtype} applies to a .pt2 or .onnx program")
        return export_classifier(checkpoint, output, classnames, pretrained)
    raise ExportError(f"--output {output}: the suffix says what to write: .pt2 (a torch.export program, every"
                      " method), .onnx (that program in ONNX) or .safetensors (a fixed classifier, text-prompt methods)")


def export_program_file(checkpoint: str, output: str, classnames=None, pretrained: str | None = None,
                        dtype: str = "float32") -> dict:
    """Write `checkpoint`'s model for `classnames` (default: its training classes) as a torch.export program to
    `output` (atomically), with its description as the extra file fastprompt.json; returns that description.
    Built on the CPU in `dtype` over the unpatched CLIP: the program holds only aten operations."""
    program, metadata = _program(checkpoint, classnames, pretrained, "torch.export.load(path).module()(images)",
                                 dtype)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={PROGRAM_METADATA: json.dumps(metadata)})
    ckpt.atomic_write_bytes(output, buffer.getvalue())
    return metadata


def export_onnx_file(checkpoint: str, output: str, classnames=None, pretrained: str | None = None,
                     dtype: str = "float32") -> dict:
    """The program of export_program_file in ONNX (torch.onnx's exporter from the ExportedProgram), input `images`,
    output `logits`, the batch dimension dynamic, the description as the model's metadata entry fastprompt.json.
    onnxruntime runs it on the probe batch against the program before anything is written."""
    import warnings

    try:
        import onnx  # noqa: F401  (torch.onnx's exporter needs onnx and onnxscript; the check, onnxruntime)
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"--output {output}: writing ONNX needs the onnx, onnxscript and onnxruntime packages"
                          f" ({exc.name} is missing): pip install 'fastprompt[onnx]'; a .pt2 program needs none"
                          ) from None
    from ..export import check_program_logits

    program, metadata = _program(checkpoint, classnames, pretrained,
                                 'onnxruntime.InferenceSession(path).run(None, {"images": images})[0]', dtype)
    metadata["format"] = ONNX_FORMAT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations, raised inside the exporter
        converted = torch.onnx.export(program, dynamo=True, verbose=False, input_names=["images"],
                                      output_names=["logits"])
    model = converted.model_proto
    _name_batch_dimension(model)
    entry = model.metadata_props.add()
    entry.key, entry.value = PROGRAM_METADATA, json.dumps(metadata)
    from google.protobuf.message import EncodeError  # protobuf comes with onnx

    try:
        data = model.SerializeToString()
    except (EncodeError, ValueError) as exc:  # protobuf's 2 GB limit on one message (the weights are inside it)
        raise ExportError(f"--output {output}: the ONNX model is too large for one file ({exc}); write a .pt2 program"
                          " instead") from None
    size = metadata["input"]["shape"][2]
    probe = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1)).to(PROGRAM_DTYPES[dtype])
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = program.module()(probe)
    got = torch.from_numpy(session.run(None, {"images": probe.numpy()})[0])
    try:
        check_program_logits(got, expected, "the ONNX model in onnxruntime", probe.dtype)
    except ValueError as exc:
        raise ExportError(f"{exc}; not written") from None
    ckpt.atomic_write_bytes(output, data)
    return metadata


def _name_batch_dimension(model) -> None:
    """The exporter names the dynamic batch dimension after its symbol (s34); call it 'batch' wherever it appears."""
    dims = [value.type.tensor_type.shape.dim for value in
            (*model.graph.input, *model.graph.output, *model.graph.value_info)]
    symbol = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        return
    for shape in dims:
        for dim in shape:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"


def _program(checkpoint: str, classnames, pretrained: str | None, usage: str, dtype: str = "float32"):
    """(ExportedProgram, description) of `checkpoint`'s model for `classnames`: the CPU, the unpatched CLIP with its
    weights in `dtype` (the trained prompts as they are)."""
    from ..data.transforms import CLIP_MEAN, CLIP_STD
    from ..export import export_program
    from .predict import Predictor

    # Predictor's amp_dtype builds the CLIP's weights in a half type (None: float32); export_program traces the
    # model itself, without the autocast that Predictor's own step would add.
    weights_dtype = PROGRAM_DTYPES[dtype]
    predictor = Predictor(checkpoint, classnames, device="cpu", pretrained=pretrained,
                          amp_dtype=None if weights_dtype == torch.float32 else weights_dtype, kernels="eager")
    manifest = predictor.manifest
    try:
        program = export_program(predictor.model, predictor.mode)
    except ValueError as exc:
        raise ExportError(f"{manifest['method']}: {exc}") from None
    backbone = manifest["backbone"]
    size = predictor.image_size
    metadata = {
        "format": PROGRAM_FORMAT, "method": manifest["method"], "mode": predictor.mode,
        "classnames": list(predictor.classnames), "backbone": backbone["name"],
        "pretrained": _weights_label(pretrained, backbone),
        "checkpoint": predictor.checkpoint, "torch": torch.__version__,
        "input": {"shape": ["batch", 3, size, size], "dtype": dtype,
                  "transform": f"RGB; shorter side resized to {size} (bicubic), centre crop {size} x {size}, /255,"
                               " then (x - mean) / std per channel (fastprompt.data.eval_transform)",
                  "mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        "output": "logits [batch, classes] (float32; softmax gives the class probabilities), classes in the order of"
                  " classnames",
        "usage": usage,
    }
    return program, metadata


def _open_clip_call(name: str, weights: str) -> str:
    """'clip = open_clip.create_model(...); ': the call that builds the CLIP the text features belong to, with the
    options its weights need that open_clip's factory does not apply itself (OpenAI's: QuickGELU); '' for
    fastprompt's tiny configs and weights files, which open_clip cannot name."""
    import open_clip

    from ..backbones import tag_model_options

    if name not in open_clip.list_models() or weights == "none" or os.path.isfile(weights):
        return ""
    options = "".join(f", {key}={value!r}" for key, value in tag_model_options(name, weights).items())
    return f"clip = open_clip.create_model({name!r}, pretrained={weights!r}{options}); "


def _weights_label(pretrained: str | None, backbone: dict) -> str:
    """The CLIP weights an export was made from, for its description: the one given, else the checkpoint's record."""
    return str((pretrained if pretrained is not None else backbone.get("pretrained")) or "none")


def read_program(path: str):
    """(torch.export.ExportedProgram, description) of a program written by export_program_file."""
    extra = {PROGRAM_METADATA: ""}
    program = torch.export.load(path, extra_files=extra)
    if not extra[PROGRAM_METADATA]:
        raise ExportError(f"{path}: a torch.export program without fastprompt's description ({PROGRAM_METADATA})")
    return program, json.loads(extra[PROGRAM_METADATA])
