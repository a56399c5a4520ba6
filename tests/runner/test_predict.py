"""predict(images, classnames) from a checkpoint, checked against the model rebuilt by hand from the
safetensors file; pretrained weights from a local file (saved from a random model) give identical features,
through the tiny config and through open_clip's factory for a registered model name."""

import torch
from safetensors.torch import load_file, save_file

import fastprompt
from fastprompt.backbones import create_clip
from fastprompt.data import eval_transform, procedural_splits
from fastprompt.runner import Predictor, predict
from runner_support import FAST, PROCEDURAL, read_json


def test_local_pretrained_file_reproduces_the_model(tmp_path):
    original = create_clip("tiny", seed=5)
    path = tmp_path / "tiny.pt"
    torch.save(original.state_dict(), path)
    loaded = create_clip("tiny", pretrained=str(path), seed=6)  # another seed: weights must come from the file
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(1, 1000, (2, 77))
    with torch.no_grad():
        assert torch.equal(original.encode_image(images), loaded.encode_image(images))
        assert torch.equal(original.encode_text(tokens), loaded.encode_text(tokens))
    assert not torch.equal(create_clip("tiny", seed=6).visual.proj, original.visual.proj)


def test_local_pretrained_file_through_the_open_clip_factory(tmp_path):
    original = create_clip("ViT-S-32-alt", seed=3)
    path = tmp_path / "vit-s-32-alt.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    loaded = create_clip("ViT-S-32-alt", pretrained=str(path), seed=4)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(original.encode_image(images), loaded.encode_image(images))


def test_predict_matches_the_model_rebuilt_from_the_checkpoint(tmp_path, cli):
    weights = tmp_path / "tiny.pt"
    torch.save(create_clip("tiny", seed=9).state_dict(), weights)
    run = tmp_path / "run"
    fast = [a for a in FAST if not a.startswith("pretrained=")]
    code, _, err = cli("train", "--method", "maple", *PROCEDURAL, "--shots", 1, "--seeds", 1, *fast,
                       f"pretrained={weights}", "epochs=2", "batch_size=2", f"output_dir={run}")
    assert code == 0, err
    folder = run / "seed1"
    manifest = read_json(folder / "checkpoint.json")
    assert manifest["backbone"]["pretrained"] == str(weights)

    # Independent reference: the backbone from the file, the method from the raw safetensors tensors.
    clip = create_clip("tiny", pretrained=str(weights))
    names = ["yellow star", "red circle", "cyan ring"]  # a new class set: deep prompts do not depend on it
    model = fastprompt.build("maple", clip, manifest["classnames"], **manifest["options"])
    loaded = model.method.load_state_dict(load_file(str(folder / "checkpoint.safetensors")), strict=False)
    # The file stores each shared tensor once (MaPLe's vision sources wrap its text prompts).
    assert not loaded.unexpected_keys and set(loaded.missing_keys) == set(manifest["aliases"])
    model.set_classnames(names)
    model.eval()
    splits = procedural_splits(num_train_per_class=2, image_size=32)
    paths = [splits.train[i].path for i in (0, 9)]
    pil = [splits.loader(p) for p in paths]
    images = torch.stack([eval_transform(32)(image) for image in pil])
    with torch.no_grad():
        expected = model(images).logits["main"].softmax(-1)

    probs = predict(pil, names, str(folder))
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))
    assert torch.allclose(probs, expected, atol=1e-6)
    predictor = Predictor(str(folder), names)
    assert predictor.mode == "novel"
    assert torch.allclose(predictor(images), expected, atol=1e-6)
    # The training class set predicts in base mode and returns one column per training class.
    assert Predictor(str(folder)).mode == "base" and Predictor(str(folder))(images).shape == (2, 4)
    # The training classes reordered, or spelled with '_' for ' ': still the base set.
    trained = list(manifest["classnames"])
    assert Predictor(str(folder), trained[::-1]).mode == "base"
    assert Predictor(str(folder), [n.replace(" ", "_") for n in trained]).mode == "base"
    assert Predictor(str(folder), trained[:-1]).mode == "novel"


def test_top_classes_reads_many_files_on_threads_in_order_and_names_the_first_bad_one(tmp_path, cli):
    """Files are decoded on threads and the next chunk while one is classified: the rows come in the files' order
    and equal one-image-at-a-time predictions; a corrupt file is the error, the first in order where two are."""
    import pytest

    from fastprompt.data.splits import CorruptImageError
    from fastprompt.runner.predict import top_classes

    run = tmp_path / "run"
    code, _, err = cli("train", "--method", "coop", *PROCEDURAL, "--shots", 1, "--seeds", 1, *FAST, "epochs=1",
                       "warmup_epochs=0", "batch_size=2", f"output_dir={run}")
    assert code == 0, err
    predictor = Predictor(str(run / "seed1"), device="cpu")
    splits = procedural_splits(num_train_per_class=2, image_size=32)
    files = []
    for i in range(7):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        splits.loader(splits.train[i].path).save(path)
        files.append(str(path))
    rows = top_classes(predictor, files, top=2, batch_size=3)  # chunks of 3, 3 and 1
    assert [row["image"] for row in rows] == files
    for row, path in zip(rows, files, strict=True):
        one = predictor([path])[0]
        values, indices = one.topk(2)
        assert [t["class"] for t in row["top"]] == [predictor.classnames[i] for i in indices.tolist()]
        assert [t["probability"] for t in row["top"]] == pytest.approx(values.tolist(), abs=1e-6)

    for bad in (5, 2):
        with open(files[bad], "wb") as handle:
            handle.write(b"not an image")
        with pytest.raises(CorruptImageError, match=f"cannot decode image {files[bad]}"):
            top_classes(predictor, files, top=1, batch_size=3)

    # With a list to take them, the bad files (2 and 5, and a whole chunk of 3: files 3, 4, 5 with 3 and 4 bad
    # too) are named in order and every other file keeps the row it had above.
    for bad in (3, 4):
        with open(files[bad], "wb") as handle:
            handle.write(b"not an image either")
    unreadable = []
    kept = top_classes(predictor, files, top=2, batch_size=3, unreadable=unreadable)
    assert [failure["image"] for failure in unreadable] == [files[2], files[3], files[4], files[5]]
    assert all(failure["error"].startswith(f"cannot decode image {failure['image']}") for failure in unreadable)
    expected = [row for row in rows if row["image"] in (files[0], files[1], files[6])]
    assert [row["image"] for row in kept] == [row["image"] for row in expected]
    for row, before in zip(kept, expected, strict=True):  # other batch compositions: equal to float tolerance
        assert [t["class"] for t in row["top"]] == [t["class"] for t in before["top"]]
        assert [t["probability"] for t in row["top"]] == pytest.approx([t["probability"] for t in before["top"]],
                                                                       abs=1e-6)
