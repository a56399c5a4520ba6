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
every call, so a call costs the image tower; on a GPU it runs under bf16 autocast unless `amp_dtype` says
otherwise (None: fp32).
"""

from __future__ import annotations

import os

import torch

from ..backbones import create_clip
from ..data import eval_transform, open_rgb_image
from . import checkpoint as ckpt


class Predictor:
    def __init__(self, checkpoint: str, classnames=None, device: str = "cpu", pretrained: str | None = None,
                 mode: str | None = None, clip=None, amp_dtype="auto"):
        import fastprompt
        from ..evaluation import _resolve_amp
        from ..text import class_list

        manifest, tensors = ckpt.load_checkpoint(checkpoint)
        self.manifest = manifest
        self.device = torch.device(device)
        self.amp_dtype = _resolve_amp(amp_dtype, self.device)
        backbone = manifest["backbone"]
        if clip is None:
            weights = pretrained if pretrained is not None else backbone.get("pretrained")
            clip = create_clip(backbone["name"], pretrained=weights, device=self.device)
        trained = list(manifest["classnames"])
        self.classnames = class_list(classnames, warn_duplicates=False) if classnames is not None else trained
        if not self.classnames:
            raise ValueError("classnames is empty")
        self.model = fastprompt.build(manifest["method"], clip, trained, **manifest["options"])
        ckpt.load_into(self.model, manifest, tensors)
        if self.classnames != trained:
            self.model.set_classnames(self.classnames)
            ckpt.load_into(self.model, manifest, tensors)  # re-checks class-specific parameters for the new set
        self.mode = mode or ("base" if self.classnames == trained else "novel")
        self.model.eval()
        self.image_size = int(clip.visual.image_size[0])
        self.transform = eval_transform(self.image_size)

    def _batch(self, images) -> torch.Tensor:
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
        tensors = []
        for i, image in enumerate(images):
            if isinstance(image, str | os.PathLike):
                image = open_rgb_image(os.fspath(image))
            elif not hasattr(image, "convert"):
                raise TypeError(
                    f"image {i} is of type {type(image).__name__}; a list holds file paths or PIL images (a batch of"
                    " tensors goes in as one float tensor [B, 3, H, W])"
                )
            tensors.append(self.transform(image))
        return torch.stack(tensors)

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        """Class probabilities [B, C] (softmax of the method's prediction logits), on the CPU."""
        x = self._batch(images).to(self.device)
        x = x.to(self.model.clip.visual.conv1.weight.dtype)
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = self.model.predict(self.model(x), self.mode).float()
        return logits.softmax(-1).cpu()


def predict(images, classnames, checkpoint: str, device: str = "cpu", pretrained: str | None = None,
            mode: str | None = None, amp_dtype="auto") -> torch.Tensor:
    """One-call form of Predictor: class probabilities [B, len(classnames)]."""
    predictor = Predictor(checkpoint, classnames, device=device, pretrained=pretrained, mode=mode, amp_dtype=amp_dtype)
    return predictor(images)
