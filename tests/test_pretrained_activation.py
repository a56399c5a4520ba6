"""Pretrained tags are built as their weights were trained: the activation, and the input normalisation.

OpenAI's CLIP weights were trained with QuickGELU (x * sigmoid(1.702 x), OpenAI's clip/model.py, which the research
repos vendor); so were MetaCLIP's and DFN's. open_clip's plain configs (ViT-B-16, RN50, ...) use nn.GELU, and its
factory builds the plain config for such a tag and only warns, so `ViT-B-16` + `openai` (the runner's default)
would run OpenAI's weights through the wrong activation. fastprompt asks open_clip for QuickGELU there
(`force_quick_gelu`, the same model as the `-quickgelu` config). No test downloads weights: the factory is called
with the options create_clip chose and no weights, and the built model's activation is read back.
"""

from __future__ import annotations

import open_clip
import pytest

import fastprompt
from fastprompt import backbones


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-32", "ViT-L-14", "RN50", "RN101"])
def test_openai_tags_need_quick_gelu(name):
    assert backbones.tag_model_options(name, "openai") == {"force_quick_gelu": True}


@pytest.mark.parametrize("name,pretrained", [
    ("ViT-B-16-quickgelu", "openai"),  # the config has it already
    ("ViT-B-16", "laion2b_s34b_b88k"),  # LAION's ViT-B/16 was trained with GELU
    ("ViT-B-16", None),  # random weights: the config as named
])
def test_tags_and_configs_that_need_nothing(name, pretrained):
    assert backbones.tag_model_options(name, pretrained) == {}


def test_a_weights_file_keeps_the_named_config(tmp_path):
    weights = tmp_path / "openai"  # a file named like a tag is still a file: its activation is not known
    weights.write_bytes(b"x")
    assert backbones.tag_model_options("ViT-B-16", str(weights)) == {}


def test_create_clip_builds_the_openai_tag_with_quick_gelu(monkeypatch, tmp_path):
    calls = []
    real = open_clip.create_model

    def without_weights(name, pretrained=None, **options):
        calls.append((name, pretrained, options))
        return real(name, pretrained=None, **options)

    monkeypatch.setattr(backbones, "cached_weights", lambda name, tag: str(tmp_path / "cached.safetensors"))
    monkeypatch.setattr(open_clip, "create_model", without_weights)
    clip = backbones.create_clip("ViT-B-32", pretrained="openai")
    assert calls[0][:2] == ("ViT-B-32", "openai") and calls[0][2]["force_quick_gelu"] is True
    info = fastprompt.inspect_clip(clip)
    assert info.text.gelu == "quick_gelu" and info.vision.gelu == "quick_gelu"


def test_the_fixed_classifier_export_names_the_open_clip_call_its_features_need():
    from fastprompt.runner.export import _open_clip_call

    assert _open_clip_call("ViT-B-16", "openai") == \
        "clip = open_clip.create_model('ViT-B-16', pretrained='openai', force_quick_gelu=True); "
    assert _open_clip_call("ViT-B-16", "laion2b_s34b_b88k") == \
        "clip = open_clip.create_model('ViT-B-16', pretrained='laion2b_s34b_b88k'); "
    assert _open_clip_call("tiny", "none") == ""


# --- weights trained on another normalisation -----------------------------------------------------------------
def test_weights_trained_on_other_statistics_are_refused_before_any_download(monkeypatch):
    """ViT-L-14's laion2b_s32b_b82k weights were trained on images normalised with mean = std = 0.5 (open_clip's
    table); fastprompt's pipeline normalises with OpenAI CLIP's statistics, so the tag is refused in one line that
    names the others, before open_clip or the network is asked anything."""
    def never(*args, **kwargs):
        raise AssertionError("nothing may be fetched or built for a refused tag")

    monkeypatch.setattr(open_clip, "create_model", never)
    monkeypatch.setattr(backbones, "host_reachable", never)
    with pytest.raises(ValueError) as error:
        backbones.create_clip("ViT-L-14", pretrained="laion2b_s32b_b82k")
    message = str(error.value)
    assert "\n" not in message and "mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in message
    assert "use another tag of ViT-L-14: openai," in message and "laion2b_s32b_b82k, " not in message


@pytest.mark.parametrize("name,pretrained", [("ViT-L-14", "openai"), ("ViT-B-16", "laion2b_s34b_b88k"),
                                             ("RN50", "openai"), ("tiny", None)])
def test_clip_normalised_weights_are_accepted(name, pretrained):
    assert backbones.tag_problem(name, pretrained) is None


def test_the_runner_refuses_such_weights_in_a_dry_run(capsys):
    from fastprompt.cli import main

    code = main(["train", "--method", "coop", "--dataset", "dtd", "--root", "/nowhere", "backbone=ViT-L-14",
                 "pretrained=laion2b_s32b_b82k", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("fastprompt: error: backbone='ViT-L-14', pretrained='laion2b_s32b_b82k': the")
