"""Class-name rules of the CoOp raw layouts, on the examples of METHODS.md §7 and the reference code."""

import json

import pytest

from fastprompt.data import build_dataset, clean_classname
from fastprompt.data.classnames import (
    CALTECH101_RENAMES,
    EUROSAT_RENAMES,
    flowers_classnames,
    pets_breed,
    read_imagenet_classnames,
    stanford_cars_classname,
    sun397_classname,
    ucf101_classname,
)


def test_string_rules():
    assert ucf101_classname("ApplyEyeMakeup") == "Apply_Eye_Makeup"
    assert clean_classname(ucf101_classname("YoYo")) == "Yo Yo"
    assert sun397_classname("/a/apse/indoor") == "indoor apse"
    assert sun397_classname("a/abbey") == "abbey"
    assert sun397_classname("/b/bakery/shop") == "shop bakery"
    assert stanford_cars_classname("Tesla Model S Sedan 2012") == "2012 Tesla Model S Sedan"
    assert pets_breed("Abyssinian_100") == "abyssinian"
    assert pets_breed("american_bulldog_10") == "american_bulldog"
    assert flowers_classnames({"2": "hard-leaved pocket orchid", "1": "pink primrose"}) == (
        "pink primrose",
        "hard-leaved pocket orchid",
    )
    assert CALTECH101_RENAMES["Faces"] == "face" and EUROSAT_RENAMES["SeaLake"] == "Sea or Lake"
    assert clean_classname("water_lilly") == "water lilly"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sun397_classname("abbey"), "not '<letter>/<name>"),
        (lambda: pets_breed("noseparator"), "not '<breed>_<number>'"),
        (lambda: ucf101_classname("lowercase"), "no CamelCase"),
        (lambda: flowers_classnames({"1": "a", "3": "b"}), "without gaps"),
    ],
)
def test_rules_reject_malformed_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_imagenet_classnames_file(tmp_path):
    path = tmp_path / "classnames.txt"
    path.write_text("n01440764 tench\nn01443537 goldfish\n\nn02012849 crane bird\n")
    assert list(read_imagenet_classnames(path).items()) == [
        ("n01440764", "tench"),
        ("n01443537", "goldfish"),
        ("n02012849", "crane bird"),
    ]
    path.write_text("n01440764 tench\ngoldfish\n")
    with pytest.raises(ValueError, match="line 2"):
        read_imagenet_classnames(path)


def test_eurosat_generated_split_applies_the_renames(tmp_path, image_writer):
    for folder in ("AnnualCrop", "SeaLake", "Forest"):
        for k in range(4):
            image_writer(tmp_path / "eurosat/2750" / folder / f"{folder}_{k}.jpg", fmt="JPEG")
    splits = build_dataset("eurosat", tmp_path, generate_split=True)
    assert splits.classnames == ("Annual Crop Land", "Forest", "Sea or Lake")


def test_caltech_generated_split_drops_background_and_easy_faces(tmp_path, image_writer):
    for folder in ("BACKGROUND_Google", "Faces", "Faces_easy", "Motorbikes", "airplanes"):
        for k in range(4):
            image_writer(tmp_path / "caltech-101/101_ObjectCategories" / folder / f"image_{k}.jpg", fmt="JPEG")
    splits = build_dataset("caltech101", tmp_path, generate_split=True)
    assert splits.classnames == ("face", "motorbike", "airplane")


def test_ucf101_generated_split_uses_midframe_folders_and_camelcase_names(tmp_path, image_writer):
    lists = tmp_path / "ucf101/ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 YoYo\n")
    train = [f"ApplyEyeMakeup/v_ApplyEyeMakeup_g0{k}_c01.avi 1" for k in range(1, 6)] + [
        f"YoYo/v_YoYo_g0{k}_c01.avi 2" for k in range(1, 6)
    ]
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("YoYo/v_YoYo_g08_c01.avi\n")
    splits = build_dataset("ucf101", tmp_path, generate_split=True, verify_files=False)
    assert splits.classnames == ("Apply Eye Makeup", "Yo Yo")
    assert splits.test[0].path.endswith("UCF-101-midframes/Yo_Yo/v_YoYo_g08_c01.jpg")
    assert (len(splits.train), len(splits.val)) == (8, 2)  # 80/20 per class


def test_sun397_and_pets_generated_splits(tmp_path):
    sun = tmp_path / "sun397"
    sun.mkdir()
    (sun / "ClassName.txt").write_text("/a/abbey\n/a/apse/indoor\n")
    (sun / "Training_01.txt").write_text(
        "".join(f"/a/abbey/sun_{k}.jpg\n/a/apse/indoor/sun_{k}.jpg\n" for k in range(5))
    )
    (sun / "Testing_01.txt").write_text("/a/apse/indoor/sun_9.jpg\n")
    splits = build_dataset("sun397", tmp_path, generate_split=True, verify_files=False)
    assert splits.classnames == ("abbey", "indoor apse")
    assert splits.test[0].label == 1 and splits.test[0].path.endswith("SUN397/a/apse/indoor/sun_9.jpg")

    pets = tmp_path / "oxford_pets/annotations"
    pets.mkdir(parents=True)
    (pets / "trainval.txt").write_text("".join(f"Abyssinian_{k} 1 1 1\namerican_bulldog_{k} 2 2 1\n" for k in range(5)))
    (pets / "test.txt").write_text("american_bulldog_99 2 2 1\n")
    splits = build_dataset("oxford_pets", tmp_path, generate_split=True, verify_files=False)
    assert splits.classnames == ("abyssinian", "american bulldog")
    assert splits.template == "a photo of a {}, a type of pet."


def test_flowers_without_split_file_says_it_needs_one(tmp_path):
    (tmp_path / "oxford_flowers/jpg").mkdir(parents=True)
    (tmp_path / "oxford_flowers/cat_to_name.json").write_text(json.dumps({"1": "pink primrose"}))
    with pytest.raises(ValueError, match="MATLAB"):
        build_dataset("oxford_flowers", tmp_path, generate_split=True)
