"""fastprompt.save_prompts / load_prompts: prompts trained in one's own loop (TrainStep) saved in the runner's
checkpoint format, and read back by load_prompts, Predictor and `fastprompt predict`, each checked against the
trained model still in memory (the reference: nothing of it went through the file)."""

import json

import pytest
import torch

import fastprompt
from fastprompt.backbones import create_clip
from fastprompt.data import eval_transform, procedural_splits
from fastprompt.runner import CheckpointError, Predictor
from fastprompt.training import TrainStep, make_optimizer

NAMES = ["red circle", "blue square", "yellow star"]


def _trained(method, **options):
    torch.manual_seed(0)
    model = fastprompt.build(method, create_clip("tiny", seed=0), NAMES, **options)
    images = torch.randn(4, 3, *model.info.image_size, generator=torch.Generator().manual_seed(1))
    if model.trainable_parameters():  # zero-shot CLIP has nothing to train (and nothing but its options to save)
        step = TrainStep(model, make_optimizer(model.trainable_parameters(), "sgd", lr=0.05))
        for _ in range(3):
            step(images, torch.tensor([0, 1, 2, 0]))
    return model.eval(), images


@pytest.mark.parametrize("method, options", [("maple", {"depth": 3}), ("coop", {"class_specific": True}),
                                             *((name, {}) for name in sorted(fastprompt.METHODS))])
def test_saved_prompts_come_back_exactly(tmp_path, method, options):
    model, images = _trained(method, **options)
    with torch.no_grad():
        expected = model.predict(model(images))
    folder = fastprompt.save_prompts(model, str(tmp_path / "prompts"), backbone="tiny")
    manifest = json.loads((tmp_path / "prompts" / "checkpoint.json").read_text())
    assert folder == str(tmp_path / "prompts") and manifest["method"] == method
    assert manifest["backbone"]["name"] == "tiny" and manifest["saved_by"] == "fastprompt.save_prompts"
    # Every option recorded, the defaults too, as the runner records them.
    assert manifest["options"] == {**fastprompt.method_options(method), **options}
    again = fastprompt.load_prompts(folder, create_clip("tiny", seed=0)).eval()
    with torch.no_grad():
        assert torch.equal(again.predict(again(images)), expected)
    if not options.get("class_specific"):  # another class set (here the same, reversed): the same prompts
        reversed_ = fastprompt.load_prompts(folder, create_clip("tiny", seed=0), classnames=NAMES[::-1]).eval()
        with torch.no_grad():
            torch.testing.assert_close(reversed_.predict(reversed_(images)), expected.flip(-1))
    # The runner's reader rebuilds the CLIP from the manifest (tiny, random weights of seed 0: the same CLIP).
    predictor = Predictor(folder, kernels="eager")
    assert predictor.classnames == NAMES and predictor.mode == "base"


def test_predict_on_image_files_from_saved_prompts(tmp_path, cli):
    model, _ = _trained("maple", depth=3)
    folder = fastprompt.save_prompts(model, str(tmp_path / "prompts"), backbone="tiny")
    splits = procedural_splits(num_train_per_class=1, image_size=32)
    path = splits.train[0].path
    image = eval_transform(32)(splits.loader(path))[None]
    with torch.no_grad():
        expected = model.predict(model(image)).softmax(-1)[0]
    photo = tmp_path / "photo.png"
    splits.loader(path).save(photo)
    code, out, err = cli("predict", folder, photo, "--top", "3", "--output", tmp_path / "p.json")
    assert code == 0, err
    written = json.loads((tmp_path / "p.json").read_text())
    got = {row["class"]: row["probability"] for row in written["predictions"][0]["top"]}
    assert got == pytest.approx({name: expected[i].item() for i, name in enumerate(NAMES)}, abs=1e-5)


def test_what_save_and_load_refuse(tmp_path):
    model, _ = _trained("coop", class_specific=True)
    with pytest.raises(TypeError, match="^save_prompts takes a model made by fastprompt.build, not Linear$"):
        fastprompt.save_prompts(torch.nn.Linear(2, 2), str(tmp_path / "x"), backbone="tiny")
    folder = fastprompt.save_prompts(model, str(tmp_path / "prompts"), backbone="tiny")
    with pytest.raises(CheckpointError, match=r"architecture differs from this model's \(given model\) in: "):
        fastprompt.load_prompts(folder, create_clip("small"))
    with pytest.raises(ValueError, match="prompts are class-specific .* it cannot take 2 classes"):
        fastprompt.load_prompts(folder, create_clip("tiny"), classnames=["cat", "dog"])
