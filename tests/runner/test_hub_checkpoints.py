"""hf-hub:<org>/<name>[/<folder>][@<revision>] checkpoints, read through huggingface_hub's own cache: a
repository laid out in a temporary hub cache as the hub client leaves it (models--<org>--<name>/refs/main,
snapshots/<commit>/...), the hub flagged offline so that no test opens a connection. Each reference is checked
against the same checkpoint read from its local folder."""

import shutil

import pytest
import torch

import fastprompt
from fastprompt.backbones import create_clip
from fastprompt.runner import CheckpointError, Predictor

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def publish(repo: str, folder, inside: str = ""):
        """`folder` as the repository `repo` at COMMIT (under `inside`), main pointing at it."""
        root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(COMMIT)
        shutil.copytree(folder, root / "snapshots" / COMMIT / inside)

    return publish


def _saved(tmp_path):
    torch.manual_seed(0)
    model = fastprompt.build("maple", create_clip("tiny", seed=0), ["red circle", "blue square"], depth=3)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)  # prompts that are not the initial ones
    return fastprompt.save_prompts(model, str(tmp_path / "prompts"), backbone="tiny")


def test_a_hub_checkpoint_is_the_checkpoint_it_holds(tmp_path, hub_cache, cli):
    folder = _saved(tmp_path)
    hub_cache("someone/maple-prompts", folder)
    hub_cache("someone/runs", folder, inside="maple-b2n/seed1")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = Predictor(folder, kernels="eager").classify(images)
    for reference in ("hf-hub:someone/maple-prompts", f"hf-hub:someone/maple-prompts@{COMMIT}",
                      "hf-hub:someone/runs/maple-b2n/seed1"):
        assert torch.equal(Predictor(reference, kernels="eager").classify(images), expected), reference
    again = fastprompt.load_prompts("hf-hub:someone/maple-prompts", create_clip("tiny", seed=0))
    reference_model = fastprompt.load_prompts(folder, create_clip("tiny", seed=0))
    assert all(torch.equal(a, b) for a, b in zip(again.trainable_parameters(),
                                                 reference_model.trainable_parameters(), strict=True))
    # The command line takes it wherever it takes a checkpoint.
    photo = tmp_path / "photo.png"
    from PIL import Image
    Image.new("RGB", (40, 40), (200, 30, 30)).save(photo)
    local = cli("predict", folder, photo, "--top", "2")
    hub = cli("predict", "hf-hub:someone/maple-prompts", photo, "--top", "2")
    assert hub[0] == 0 and hub[1] == local[1], hub[2]


@pytest.mark.parametrize("reference, message", [
    ("hf-hub:someone/absent", r"^hf-hub:someone/absent: cannot fetch someone/absent from the Hugging Face Hub, nor "
                              r"find it in its cache \("),
    ("hf-hub:someone/maple-prompts/seed7", r"^hf-hub:someone/maple-prompts/seed7: the repository "
                                           r"someone/maple-prompts has no folder 'seed7'$"),
    ("hf-hub:maple-prompts", r"is not a hub checkpoint: write hf-hub:<org>/<name>\[/<folder>\]\[@<revision>\]$"),
    ("hf-hub:someone/maple-prompts@", r"is not a hub checkpoint"),
])
def test_what_is_not_there_is_one_line(tmp_path, hub_cache, cli, reference, message):
    hub_cache("someone/maple-prompts", _saved(tmp_path))
    with pytest.raises(CheckpointError, match=message):
        Predictor(reference)
    code, _, err = cli("predict", reference, tmp_path / "prompts" / "checkpoint.json")
    assert code == 2 and err.count("\n") == 1 and err.startswith("fastprompt: error: hf-hub:"), err
