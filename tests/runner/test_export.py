"""`fastprompt export`: a text-prompt method as one matrix over plain CLIP image features. The reference is
open_clip's own, unpatched `encode_image` and the Predictor's probabilities for the same checkpoint and classes."""

import json

import pytest
import torch
from runner_support import FAST, PROCEDURAL
from safetensors import safe_open
from safetensors.torch import load_file

from fastprompt.runner import Predictor

ARGS = ["--shots", "2", "--seeds", "1", *FAST, *PROCEDURAL, "epochs=2", "batch_size=4"]


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
    assert "fastprompt predict" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "classifier.safetensors").exists()
