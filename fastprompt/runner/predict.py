"""Class probabilities from a saved checkpoint, outside the runner.

    from fastprompt.runner import predict, Predictor
    probs = predict(["cat.jpg", "dog.jpg"], ["cat", "dog", "bird"], "runs/coop-b2n-.../seed1")
    model = Predictor("runs/.../seed1", classnames=["cat", "dog"])      # reuse for many calls
    probs = model(images)                                                # [B, C], rows sum to 1

Images are file paths, PIL images, or a float tensor [B, 3, H, W] already normalised with the CLIP
statistics (what `fastprompt.data.eval_transform` gives). Paths and PIL images go through the evaluation
transform (resize the shorter side, centre crop, normalise). A tensor is never normalised here: an integer
(e.g. uint8) tensor, an empty batch or a list of anything else is an error naming what was found.

The backbone is re-created from the checkpoint's record (open_clip name + pretrained tag or file); pass
`pretrained=` where the weights live elsewhere on this machine. New class names are fine for every
method whose parameters do not depend on the class count; the prediction mode is 'base' on the training
classes and 'novel' otherwise (MMRL's decoupled inference), unless `mode` is given.

A Predictor computes the class set's text features once (PromptedCLIP's inference cache) and reuses them for
every call, so a call costs the image tower; it steps through the evaluation engine (fastprompt.evaluation.EvalStep:
a CUDA graph for a batch shape seen again). On a GPU it runs bf16 weights under bf16 autocast unless `amp_dtype`
says otherwise (None: fp32). `device='auto'` takes the GPU where there is one (a CLIP passed in stays on its device),
and the CLIP it creates runs fastprompt's fast path (`kernels`: a patch backend, or 'eager' for the unpatched
model). `checkpoint` is a checkpoint folder, its checkpoint.json, or a run folder of one seed.
"""

from __future__ import annotations

import os

import torch

from .. import backbone as bb
from ..backbones import create_clip
from ..data import CorruptImageError, eval_transform, open_rgb_image
from ..evaluation import EvalStep
from . import checkpoint as ckpt
from .engine import resolve_device
from .machine import usable_cpus


class Predictor:
    def __init__(self, checkpoint: str, classnames=None, device: str = "auto", pretrained: str | None = None,
                 mode: str | None = None, clip=None, amp_dtype="auto", kernels: str = "auto"):
        import fastprompt
        from ..evaluation import _resolve_amp
        from ..text import class_list, clean_classname

        self.checkpoint = os.path.abspath(_checkpoint_of(checkpoint))
        manifest, tensors = ckpt.load_checkpoint(self.checkpoint)
        self.manifest = manifest
        if device == "auto" and clip is not None:  # the caller's CLIP stays where it is
            device = next(clip.parameters()).device
        # 'auto': the GPU where there is one; a device this machine lacks (cuda without a GPU, cuda:3 of 1) is one
        # error naming it, as in the runner.
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.amp_dtype = _resolve_amp(amp_dtype, self.device)
        backbone = manifest["backbone"]
        if clip is None:
            weights = pretrained if pretrained is not None else backbone.get("pretrained")
            # Weights in the autocast dtype where it is a half type (the runner's GPU numerics: bf16 weights under
            # bf16 autocast; fp16 before Ampere).
            precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")
            clip = create_clip(backbone["name"], pretrained=weights, precision=precision, device=self.device)
            if kernels != "eager":  # the fast path, exact (a CLIP passed in is used as it comes)
                fastprompt.patch(clip, backend=kernels)
        trained = list(manifest["classnames"])
        self.classnames = class_list(classnames) if classnames is not None else trained
        if not self.classnames:
            raise ValueError("classnames is empty")
        self.model = fastprompt.build(manifest["method"], clip, trained, **manifest["options"])
        ckpt.load_into(self.model, manifest, tensors)
        if self.classnames != trained:
            self.model.set_classnames(self.classnames)
            ckpt.load_into(self.model, manifest, tensors)  # re-checks class-specific parameters for the new set
        # Base on the training classes in any order or spelling that cleans alike ('blue_square', 'blue square').
        same_set = sorted(map(clean_classname, self.classnames)) == sorted(map(clean_classname, trained))
        self.mode = mode or ("base" if same_set else "novel")
        self.model.eval()
        # The evaluation engine's step: the cached class text, the autocast, and a CUDA graph for a batch shape seen
        # again (a folder predicted in chunks of one size).
        self._step = EvalStep(self.model, mode=self.mode, amp_dtype=self.amp_dtype, device=self.device)
        self.image_size = bb.image_size_of(clip.visual)[0]
        self.transform = eval_transform(self.image_size)

    def prepare(self, images) -> torch.Tensor:
        """The model's input for `images` (file paths, PIL images, or a normalised float tensor), on the CPU."""
        if torch.is_tensor(images):
            # Checked here, before the cast to the weights' dtype below would turn uint8 pixels into
            # unnormalised floats that predict quietly wrong classes.
            if not images.is_floating_point():
                raise TypeError(
                    f"images is a {images.dtype} tensor; a tensor must be float, already normalised with the CLIP"
                    " statistics (fastprompt.data.eval_transform); pass file paths or PIL images to have them"
                    " resized and normalised here"
                )
            if images.dim() not in (3, 4) or images.shape[-3] != 3:
                raise ValueError(f"images must have shape [B, 3, H, W] or [3, H, W], got {tuple(images.shape)}")
            if images.shape[0] == 0:
                raise ValueError(f"the image batch is empty (shape {tuple(images.shape)}); give at least one image")
            return images if images.dim() == 4 else images.unsqueeze(0)
        if isinstance(images, str | os.PathLike) or hasattr(images, "convert"):
            images = [images]
        try:
            images = list(images)
        except TypeError:
            raise TypeError(
                f"images must be file paths, PIL images or a float tensor, not {type(images).__name__}"
            ) from None
        if not images:
            raise ValueError("no images given: the list of images is empty")
        for i, image in enumerate(images):  # every item's kind checked before any file is read
            if not isinstance(image, str | os.PathLike) and not hasattr(image, "convert"):
                raise TypeError(
                    f"image {i} is of type {type(image).__name__}; a list holds file paths or PIL images (a batch of"
                    " tensors goes in as one float tensor [B, 3, H, W])"
                )
        # Decoded and transformed on threads (PIL and torch release the GIL), in order: the first bad file in the
        # list is the error, as it was one at a time.
        return torch.stack(list(self._threads().map(self._prepare_one, images)))

    def _prepare_one(self, image) -> torch.Tensor:
        if isinstance(image, str | os.PathLike):
            image = open_rgb_image(os.fspath(image))
        return self.transform(image)

    def _threads(self):
        if getattr(self, "_pool", None) is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=min(8, usable_cpus()),
                                            thread_name_prefix="fastprompt-predict")
        return self._pool

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, C] of a prepared batch (Predictor.prepare), on the CPU."""
        x = x.to(self.device).to(self.model.clip.visual.conv1.weight.dtype)
        return self._step(x).float().softmax(-1).cpu()

    def __call__(self, images) -> torch.Tensor:
        """Class probabilities [B, C] (softmax of the method's prediction logits), on the CPU."""
        return self.classify(self.prepare(images))


def predict(images, classnames, checkpoint: str, device: str = "auto", pretrained: str | None = None,
            mode: str | None = None, amp_dtype="auto", kernels: str = "auto") -> torch.Tensor:
    """One-call form of Predictor: class probabilities [B, len(classnames)]."""
    predictor = Predictor(checkpoint, classnames, device=device, pretrained=pretrained, mode=mode, amp_dtype=amp_dtype,
                          kernels=kernels)
    return predictor(images)


def _checkpoint_of(path) -> str:
    """A checkpoint folder or checkpoint.json as given; a run folder of one seed is that seed's checkpoint, and of
    several an error that lists them (their prompts differ: the caller picks one)."""
    from .run import finished_checkpoints

    found = finished_checkpoints(path)
    if len(found) > 1:
        raise ckpt.CheckpointError(f"{os.fspath(path)} is a run folder of {len(found)} seeds; give one of them:"
                                   f" {', '.join(found)}")
    return found[0]


def image_files(paths) -> list[str]:
    """Image files from files and folders as given: a folder contributes its images, sub-folders included, in sorted
    order; a file is taken as it is (whatever its extension: open_rgb_image judges it). A missing path is an error."""
    from ..data.files import is_image_name

    files = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = [os.path.join(folder, name) for folder, subfolders, names in sorted(os.walk(path))
                     for name in sorted(names) if is_image_name(name)]
            if not found:
                raise FileNotFoundError(f"no image files in folder {path}")
            files += found
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"image file not found: {path}")
    if not files:
        raise ValueError("no images given")
    return files


def top_classes(predictor: Predictor, files: list[str], top: int = 5, batch_size: int = 100,
                unreadable: list | None = None) -> list[dict]:
    """{'image', 'top': [{'class', 'probability'}, ...]} per file, the `top` most probable classes first; images
    are read and predicted `batch_size` at a time, so any number of files runs in bounded memory.

    A file that does not decode raises CorruptImageError naming it; with a list as `unreadable`, it is appended
    there as {'image', 'error'} instead and the other files are still predicted (a folder of thousands of photos
    with one bad file keeps the rest's predictions)."""
    if top < 1 or batch_size < 1:
        raise ValueError(f"top and batch_size must be at least 1, got top={top}, batch_size={batch_size}")
    from concurrent.futures import ThreadPoolExecutor

    k = min(top, len(predictor.classnames))
    chunks = [files[start:start + batch_size] for start in range(0, len(files), batch_size)]
    read = predictor.prepare if unreadable is None else lambda chunk: _read_what_decodes(predictor, chunk)
    rows = []
    # The next chunk is read while this one is classified, so the device does not wait for the decoding.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastprompt-prefetch") as ahead:
        pending = ahead.submit(read, chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            x = pending.result()
            if i + 1 < len(chunks):
                pending = ahead.submit(read, chunks[i + 1])
            if unreadable is not None:
                x, chunk, failures = x
                unreadable += failures
                if x is None:
                    continue
            values, indices = predictor.classify(x).topk(k, dim=-1)
            for path, probabilities, classes in zip(chunk, values.tolist(), indices.tolist(), strict=True):
                rows.append({"image": path, "top": [{"class": predictor.classnames[c], "probability": p}
                                                    for p, c in zip(probabilities, classes, strict=True)]})
    return rows


def _read_what_decodes(predictor: Predictor, chunk: list[str]):
    """(batch of the files that decode or None, those files, [{'image', 'error'}] of the others), in order."""
    def attempt(path):
        try:
            return predictor._prepare_one(path)
        except CorruptImageError as error:
            return error

    kept, tensors, failures = [], [], []
    for path, item in zip(chunk, predictor._threads().map(attempt, chunk), strict=True):
        if isinstance(item, CorruptImageError):
            failures.append({"image": path, "error": str(item)})
        else:
            kept.append(path)
            tensors.append(item)
    return (torch.stack(tensors) if tensors else None), kept, failures
