"""check_layout names every missing folder, absent file and corrupt image, and says what it checked."""

import json
import os
import shutil

import pytest

from fastprompt.data import CorruptImageError, build_dataset, check_layout
from fastprompt.data.wnid_subsets import IMAGENET_A_WNIDS


def _corrupt(path):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])  # truncated: the header opens, the decode fails


def test_good_layouts_pass_and_say_how_many_images_were_decoded(fake_imagenet, fake_caltech):
    report = check_layout("imagenet", fake_imagenet, verify_images="all")
    assert report.ok, report.format()
    assert report.images_checked == report.images_total == 25
    assert "decoded every image on disk; 0 failed" in report.format()
    assert report.warnings == ["classnames.txt names 5 classes; ImageNet's file names 1000"]
    root, _ = fake_caltech
    report = check_layout("caltech101", root)
    assert report.ok and report.images_checked == 24
    # A toy split is not the published one: flagged as a warning, not a problem.
    assert any("differ from the published 4128/1649/2465" in w for w in report.warnings)


def test_missing_class_folder_is_named(fake_imagenet):
    shutil.rmtree(fake_imagenet / "imagenet/images/train/n01443537")
    report = check_layout("imagenet", fake_imagenet, verify_images="none")
    assert not report.ok
    assert "images/train: found 4/5 class folders; missing: n01443537" in report.format()
    assert "expected layout:" in report.format() and "classnames.txt" in report.format()


def test_missing_classnames_file_is_named(fake_imagenet):
    os.remove(fake_imagenet / "imagenet/classnames.txt")
    report = check_layout("imagenet", fake_imagenet)
    assert any(f"{fake_imagenet / 'imagenet/classnames.txt'} does not exist" in p for p in report.problems)


def test_empty_and_unexpected_folders_and_loose_files(fake_imagenet, image_writer):
    val = fake_imagenet / "imagenet/images/val"
    for name in os.listdir(val / "n01491361"):
        os.remove(val / "n01491361" / name)
    (val / "n99999999").mkdir()
    image_writer(val / "ILSVRC2012_val_00000009.JPEG", fmt="JPEG")
    message = check_layout("imagenet", fake_imagenet).format()
    assert "1 class folders hold no images: n01491361" in message
    assert "1 class folders are not expected: n99999999" in message
    assert "1 images lie directly in the folder" in message and "valprep" in message


def test_split_file_naming_absent_files(fake_caltech):
    root, _ = fake_caltech
    for name in ("Faces/image_0001.jpg", "accordion/image_0005.jpg", "water_lilly/image_0000.jpg"):
        os.remove(root / "caltech-101/101_ObjectCategories" / name)
    report = check_layout("caltech101", root)
    problem = next(p for p in report.problems if "do not exist" in p)
    assert problem.startswith("split file names 3 files that do not exist:")
    for name in ("Faces/image_0001.jpg", "accordion/image_0005.jpg", "water_lilly/image_0000.jpg"):
        assert name in problem


def test_corrupt_image_is_named_with_the_decoder_error(fake_caltech):
    root, _ = fake_caltech
    bad = root / "caltech-101/101_ObjectCategories/Leopards/image_0003.jpg"
    _corrupt(bad)
    report = check_layout("caltech101", root, verify_images="all")
    assert not report.ok
    assert any("1 of 24 checked images are corrupt" in p and str(bad) in p for p in report.problems)
    # Loading the same image for training fails with an error that names it too.
    splits = build_dataset("caltech101", root)
    index = [s.path for s in splits.train].index(str(bad))
    with pytest.raises(CorruptImageError, match="cannot decode image .*image_0003.jpg"):
        splits.dataset("train")[index]


def test_sampled_verification_checks_at_most_max_images(fake_caltech):
    root, _ = fake_caltech
    report = check_layout("caltech101", root, verify_images="sample", max_images=5)
    assert report.images_checked == 5 and report.images_total == 24
    assert "a random sample of 5 of the 24 images on disk" in report.format()
    repeat = check_layout("caltech101", root, verify_images="sample", max_images=5)
    assert repeat.notes == report.notes


def test_missing_split_file_and_folder(tmp_path, fake_caltech):
    report = check_layout("eurosat", tmp_path)
    assert report.problems == [f"dataset folder {tmp_path / 'eurosat'} does not exist"]
    root, _ = fake_caltech
    os.remove(root / "caltech-101/split_zhou_Caltech101.json")
    report = check_layout("caltech101", root)
    assert any("split_zhou_Caltech101.json does not exist" in p for p in report.problems)


def test_malformed_split_file_is_a_problem(fake_caltech):
    root, _ = fake_caltech
    (root / "caltech-101/split_zhou_Caltech101.json").write_text(json.dumps({"train": [["a.jpg", 0, "x"]], "val": []}))
    report = check_layout("caltech101", root)
    assert any("has no 'test' list" in p for p in report.problems)


def test_imagenet_a_missing_wnids_are_named(fake_imagenet_a):
    root, _ = fake_imagenet_a
    for wnid in IMAGENET_A_WNIDS[:3]:
        shutil.rmtree(root / "imagenet-adversarial/imagenet-a" / wnid)
    message = check_layout("imagenet_a", root, verify_images="none").format()
    assert f"found 197/200 class folders; missing: {', '.join(IMAGENET_A_WNIDS[:3])}" in message


def test_custom_and_procedural(tmp_path, image_writer):
    assert check_layout("procedural", tmp_path).ok
    for cls in ("cat", "dog"):
        for k in range(4):
            image_writer(tmp_path / "pets" / cls / f"{k}.png")
    assert check_layout("imagefolder", tmp_path / "pets").ok
    assert not check_layout("imagefolder", tmp_path / "absent").ok
    # A CSV whose files are elsewhere: each missing one is a problem, and nothing is said to be decoded.
    rows = "".join(f"old/{k}.png,{cls}\n" for cls in ("cat", "dog") for k in range(5))
    (tmp_path / "moved.csv").write_text("path,classname\n" + rows)
    report = check_layout("csv", tmp_path / "moved.csv")
    assert report.problems[0].startswith("10 listed images do not exist: ")
    assert report.notes[-1] == "no listed image is on disk: nothing to decode" and report.images_checked == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="verify_images"):
        check_layout("dtd", "/tmp", verify_images="some")


def test_flowers_split_names_are_compared_with_cat_to_name(tmp_path, image_writer):
    dataset_dir = tmp_path / "oxford_flowers"
    split = {
        "train": [["image_00001.jpg", 0, "pink primrose"]],
        "val": [["image_00002.jpg", 1, "globe thistle"]],
        "test": [],
    }
    for part in split.values():
        for entry in part:
            image_writer(dataset_dir / "jpg" / entry[0], fmt="JPEG")
    (dataset_dir / "split_zhou_OxfordFlowers.json").write_text(json.dumps(split))
    (dataset_dir / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "2": "hard-leaved pocket orchid"}))
    report = check_layout("oxford_flowers", tmp_path)
    assert report.ok
    assert any(
        "differ from cat_to_name.json" in w and "'globe thistle' vs 'hard-leaved pocket orchid'" in w
        for w in report.warnings
    )
