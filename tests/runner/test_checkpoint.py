"""Checkpoints and training states: exact round trips, clear errors for corrupt files and for loading into
another method, backbone or class set, class-count-independent loading, and atomic writes."""

import json
import os
import random

import numpy as np
import pytest
import torch

import fastprompt
from fastprompt.backbones import create_clip
from fastprompt.runner import checkpoint as ckpt
from fastprompt.runner.checkpoint import CheckpointError

NAMES = ["red circle", "blue square", "green triangle"]


def trained(clip, method="coop", names=NAMES, **options):
    """A model whose parameters are moved away from their initial values (a checkpoint of init proves little)."""
    model = fastprompt.build(method, clip, names, **options)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p))
    return model


def save(model, folder, method="coop", options=None, name="tiny"):
    backbone = ckpt.backbone_record(model, name, None)
    ckpt.save_checkpoint(str(folder), model, method, options or {}, backbone, {"method": method}, {"seed": 1})
    return str(folder)


def test_round_trip_gives_the_same_parameters_and_logits(tiny_clip, tmp_path):
    model = trained(tiny_clip, "maple")
    folder = save(model, tmp_path / "ck", "maple")
    images = torch.randn(2, 3, 32, 32)
    for path in (folder, os.path.join(folder, "checkpoint.json"), os.path.join(folder, "checkpoint.safetensors")):
        torch.manual_seed(123)
        fresh = fastprompt.build("maple", tiny_clip, NAMES)
        manifest, tensors = ckpt.load_checkpoint(path)
        ckpt.load_into(fresh, manifest, tensors)
        for (k, a), (_, b) in zip(model.method.state_dict().items(), fresh.method.state_dict().items(), strict=True):
            assert torch.equal(a, b), k
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(images).logits["main"], fresh(images).logits["main"])
    assert manifest["classnames"] == NAMES and manifest["method"] == "maple" and manifest["seed"] == 1
    assert set(manifest["versions"]) >= {"fastprompt", "torch", "open_clip"} and "git_commit" in manifest


def test_corrupt_files_are_clear_errors(tiny_clip, tmp_path):
    folder = save(trained(tiny_clip), tmp_path / "ck")
    tensor_path, manifest_path = os.path.join(folder, "checkpoint.safetensors"), os.path.join(folder, "checkpoint.json")
    original = open(tensor_path, "rb").read()
    with open(tensor_path, "wb") as handle:
        handle.write(original[:-7] + b"garbage")
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        ckpt.load_checkpoint(folder)
    with open(tensor_path, "wb") as handle:
        handle.write(original)
    text = open(manifest_path).read()
    with open(manifest_path, "w") as handle:
        handle.write(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="checkpoint manifest .* is not valid JSON"):
        ckpt.load_checkpoint(folder)
    with open(manifest_path, "w") as handle:
        json.dump({"format": "something else"}, handle)
    with pytest.raises(CheckpointError, match="is not a fastprompt.checkpoint/1 manifest"):
        ckpt.load_checkpoint(folder)
    os.remove(manifest_path)
    with pytest.raises(CheckpointError, match="checkpoint manifest not found"):
        ckpt.load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ckpt.load_checkpoint(str(tmp_path / "nowhere"))


def test_another_method_or_backbone_is_refused(tiny_clip, tmp_path):
    manifest, tensors = ckpt.load_checkpoint(save(trained(tiny_clip), tmp_path / "ck"))
    with pytest.raises(CheckpointError, match="holds 'coop' prompts; they cannot be loaded into method 'maple'"):
        ckpt.load_into(fastprompt.build("maple", tiny_clip, NAMES), manifest, tensors)
    small = create_clip("small")
    with pytest.raises(CheckpointError, match="backbone 'tiny', whose architecture differs .* embed_dim"):
        ckpt.load_into(fastprompt.build("coop", small, NAMES), manifest, tensors)
    wider = fastprompt.build("coop", tiny_clip, NAMES, n_ctx=8)
    with pytest.raises(CheckpointError, match="shapes do not fit"):
        ckpt.load_into(wider, manifest, tensors)


def test_generic_context_loads_into_a_new_class_set_but_class_specific_does_not(tiny_clip, tmp_path):
    model = trained(tiny_clip, "coop", n_ctx=4)
    manifest, tensors = ckpt.load_checkpoint(save(model, tmp_path / "generic", options={"n_ctx": 4}))
    other = fastprompt.build("coop", tiny_clip, ["yellow star", "purple cross", "orange heart", "cyan ring"], n_ctx=4)
    ckpt.load_into(other, manifest, tensors)
    key = "text_sources.1.tokens"
    assert torch.equal(other.method.state_dict()[key], model.method.state_dict()[key])

    csc = trained(tiny_clip, "coop", n_ctx=4, class_specific=True)
    manifest, tensors = ckpt.load_checkpoint(save(csc, tmp_path / "csc", options={"n_ctx": 4, "class_specific": True}))
    names = ["yellow star", "purple cross", "cyan ring"]
    new = fastprompt.build("coop", tiny_clip, names, n_ctx=4, class_specific=True)
    with pytest.raises(CheckpointError, match="class-specific context for its 3 training classes"):
        ckpt.load_into(new, manifest, tensors)


def test_atomic_write_leaves_the_old_file_and_no_temporary_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    ckpt.atomic_write_json(str(path), {"v": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write_json(str(path), {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["results.json"]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_training_state_restores_optimizer_and_every_rng(tiny_clip, tmp_path, optimizer_name):
    from fastprompt.training import make_optimizer

    model = trained(tiny_clip, "coop", n_ctx=4)
    optimizer = make_optimizer(model.trainable_parameters(), optimizer_name, 0.01)
    loss, _ = model.loss(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    cpu = torch.device("cpu")
    ckpt.save_state(str(tmp_path / "state"), 3, model, optimizer, generator, cpu, history=[{"epoch": 3}])
    expected = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=generator))

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    other = fastprompt.build("coop", tiny_clip, NAMES, n_ctx=4)
    other_optimizer = make_optimizer(other.trainable_parameters(), optimizer_name, 0.01)
    other_generator = torch.Generator().manual_seed(0)
    manifest, tensors = ckpt.load_state(str(tmp_path / "state"))
    epoch = ckpt.restore_state(manifest, tensors, other, other_optimizer, other_generator, torch.device("cpu"))
    assert epoch == 3 and manifest["history"] == [{"epoch": 3}]
    got = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=other_generator))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]
    assert torch.equal(got[3], expected[3])
    saved, restored = optimizer.state_dict(), other_optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    for index, values in saved["state"].items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored["state"][index][name])), name


def _rewrite_manifest(folder, change):
    path = os.path.join(folder, "checkpoint.json")
    with open(path) as handle:
        manifest = json.load(handle)
    change(manifest)
    with open(path, "w") as handle:
        json.dump(manifest, handle)


def test_a_checkpoint_written_before_the_cnn_field_still_loads(tiny_clip, tmp_path):
    """Manifests written before BackboneInfo had `vision_tower` lack it; every one of them was a transformer."""
    model = trained(tiny_clip)
    folder = save(model, tmp_path / "ck")
    _rewrite_manifest(folder, lambda m: m["backbone"]["info"].pop("vision_tower"))
    manifest, tensors = ckpt.load_checkpoint(folder)
    fresh = fastprompt.build("coop", tiny_clip, NAMES)
    ckpt.load_into(fresh, manifest, tensors)
    for name, value in model.method.state_dict().items():
        assert torch.equal(fresh.method.state_dict()[name], value), name


def test_prompts_learned_through_another_activation_are_refused_with_the_reason(tiny_clip, tmp_path):
    """A checkpoint of a CLIP built with GELU (open_clip's plain ViT-B-16 with OpenAI's weights, as fastprompt built
    it before it asked for the weights' QuickGELU) does not load into the QuickGELU model silently."""
    folder = save(trained(tiny_clip), tmp_path / "ck")

    def as_quick_gelu(manifest):  # the tiny CLIP is GELU: the checkpoint claims the other activation
        for tower in ("text", "vision"):
            manifest["backbone"]["info"][tower]["gelu"] = "quick_gelu"

    _rewrite_manifest(folder, as_quick_gelu)
    manifest, tensors = ckpt.load_checkpoint(folder)
    with pytest.raises(CheckpointError, match=r"built with quick_gelu blocks, and this model has gelu: its prompts"
                                              r" were learned through another activation.*train them again"):
        ckpt.load_into(fastprompt.build("coop", tiny_clip, NAMES), manifest, tensors)
