"""A trained model as a self-contained PyTorch program: images in, class logits out, no fastprompt needed.

    program = fastprompt.export.export_program(model)          # torch.export.ExportedProgram, any batch size
    torch.export.save(program, "maple-dtd.pt2")
    logits = torch.export.load("maple-dtd.pt2").module()(images)   # [B, C]; anywhere torch runs

Every method exports, the ones that prompt the image tower (VPT, MaPLe, MMRL, ...) and the ones whose text depends
on each image (CoCoOp, MCPL-CLIP) included: the program is the model's own evaluation forward, traced by
torch.export (non-strict) with the class set's text features and every image-independent prompt computed once and
kept as constants. Only the weights the forward reads are kept: for a method whose text does not depend on the
image, the text tower is not in the program at all. The batch dimension is dynamic; the image size, the dtype
(the CLIP's: float32, or bf16/fp16 for a half-precision CLIP; images normalised as CLIP's evaluation transform does)
and the class set are fixed, and a program given another size or dtype refuses it. Before it is returned, the
program is checked against the model on a probe batch.

The model must run the unpatched (eager) path: a patched CLIP's kernels are fastprompt's registered ops, which a
program would need fastprompt to load. `fastprompt export CHECKPOINT --output x.pt2` builds such a model from a
checkpoint and writes the program with a description of its input (fastprompt.runner.export).
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .backbone import compute_dtype
from .fast import is_patched
from .model import PromptedCLIP


class ClassLogits(torch.nn.Module):
    """`images` [B, 3, H, W] -> `model.predict(model(images), mode)` in float32, the evaluation cache held.

    The model is kept outside the module's registered children on purpose: torch.export lifts a root module's
    every parameter and buffer into the program, used or not (the whole text tower of a method that needs only its
    features), while tensors it reads from elsewhere become constants only where the traced forward reads them."""

    def __init__(self, model: PromptedCLIP, mode: str = "base"):
        super().__init__()
        if mode not in ("base", "novel"):
            raise ValueError(f"mode must be 'base' or 'novel', got {mode!r}")
        object.__setattr__(self, "model", model)
        self.mode = mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.model.holding_inference_cache():
            return self.model.predict(self.model(images), self.mode).float()


def export_problem(model: PromptedCLIP) -> str | None:
    """Why `model` cannot be exported as a program now (None when it can)."""
    if not isinstance(model, PromptedCLIP):
        return f"expected a fastprompt model (fastprompt.build), got {type(model).__name__}"
    if is_patched(model.clip):
        return ("its CLIP is patched (fastprompt.patch): the program would hold fastprompt's kernels; export a model"
                " over an unpatched CLIP (fastprompt.unpatch(clip), or build it before patching)")
    if model.text_sharding is not None:
        return "its text is sharded over processes (shard_text_classes): export from one process, unsharded"
    return None


def export_program(model: PromptedCLIP, mode: str = "base", probe_batch: int = 3) -> torch.export.ExportedProgram:
    """`model`'s class logits for its current class set as a torch.export program (see the module's docstring).
    The model is traced in eval mode and left in the mode it was in. The program computes in the CLIP's dtype
    (open_clip's cast dtype, its matmul weights'), without autocast, on its device, and takes images in that dtype: a
    bf16 CLIP gives a bf16 program (its logits within a few bf16 ulps of the model's), a float32 one a float32
    program."""
    problem = export_problem(model)
    if problem is not None:
        raise ValueError(f"cannot export this model: {problem}")
    if probe_batch < 2:
        raise ValueError(f"probe_batch must be at least 2 (a batch of 1 would fix the batch size), got {probe_batch}")
    was_training = model.training
    model.eval()
    try:
        program, got, expected = _trace(model, mode, probe_batch)
    finally:
        model.train(was_training)  # a model exported between epochs goes on training
    check_program_logits(got, expected, "the exported program", compute_dtype(model.clip))
    return program


def _trace(model: PromptedCLIP, mode: str, probe_batch: int):
    """(program, its logits at batch 1, the model's) for the model in eval mode."""
    device = model.clip.positional_embedding.device
    # The dtype the towers compute in: open_clip's half precisions (precision="bf16") keep the embeddings and the
    # LayerNorms in float32 and cast activations to the matmul weights' dtype, which the images come in.
    dtype = compute_dtype(model.clip)
    module = ClassLogits(model, mode)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(probe_batch, 3, *model.info.image_size, generator=generator).to(device, dtype)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        expected = module(probe)
        # Traced with SDPA's math backend, whose output is laid out [B, H, L, D]: torch before 2.13 records a
        # `.contiguous()` that is a no-op at the traced layout as nothing, and a reshape as a view, so a trace over
        # the CPU's flash kernel (output laid out [B, L, H, D]) would hold views that fail on a device whose SDPA
        # lays its output out otherwise. At the math layout each contiguous() is a real copy and stays in the graph;
        # at run time the program calls scaled_dot_product_attention, which picks that device's best kernel.
        with sdpa_kernel(SDPBackend.MATH):
            program = torch.export.export(module, (probe,), dynamic_shapes=({0: batch},), strict=False)
        # A constant that views part of a larger tensor (MuDPT's per-layer vision tokens are slices of one) is
        # copied out: torch.export.save groups tensors by storage and warns where none covers its storage whole.
        for name, value in list(program.constants.items()):
            if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes() != value.nbytes:
                program.constants[name] = value.clone()
        # A different batch size than the traced one: a dimension fixed by the trace would show here.
        got = program.module()(probe[:1].clone())
    return program, got, expected[:1]


def check_program_logits(got: torch.Tensor, expected: torch.Tensor, what: str,
                         dtype: torch.dtype = torch.float32) -> None:
    """`got` must be the model's logits `expected` to the rounding of a re-ordered graph computing in `dtype` (1e-4
    relative in float32; 8 ulps of bf16 or fp16 in those); a ValueError that gives the largest difference otherwise."""
    tolerance = max(1e-4, 8 * torch.finfo(dtype).eps)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=tolerance, atol=tolerance * (1 + float(
            expected.abs().max()))):
        detail = (f"shape {tuple(got.shape)} for {tuple(expected.shape)}" if got.shape != expected.shape
                  else f"largest difference {(got - expected).abs().max().item():.3g}")
        raise ValueError(f"{what} does not reproduce the model's logits ({detail})")
