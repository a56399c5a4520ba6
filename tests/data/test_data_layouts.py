"""Loading the CoOp layouts from small fake datasets: paths, labels, class names, templates, errors."""

import json
import os

import numpy as np
import pytest

from fastprompt.data import (DatasetError, build_dataset, check_layout, dataset_options, known_dataset_names,
                             resolve_dataset_name)
from fastprompt.data.wnid_subsets import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS


def test_imagenet_labels_follow_sorted_wnids_and_val_is_the_test_split(fake_imagenet, imagenet_names):
    names = imagenet_names
    splits = build_dataset("imagenet", fake_imagenet)
    wnids = sorted(names)
    assert splits.class_ids == tuple(wnids)
    assert splits.classnames == tuple(names[w] for w in wnids)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 0, 10)
    image_dir = os.path.join(str(fake_imagenet), "imagenet", "images")
    expected_train = [
        (os.path.join(image_dir, "train", w, f"{w}_{k}.JPEG"), label, names[w])
        for label, w in enumerate(wnids)
        for k in range(3)
    ]
    assert [(s.path, s.label, s.classname) for s in splits.train] == expected_train
    assert {os.path.dirname(s.path).split(os.sep)[-2] for s in splits.test} == {"val"}
    assert splits.fewshot_dir == os.path.join(str(fake_imagenet), "imagenet", "split_fewshot")
    image, label = splits.dataset("train")[4]
    assert image.size == (8, 8) and label == 1


def test_imagenet_missing_class_folder_is_named_not_shifted(fake_imagenet):
    os.rename(fake_imagenet / "imagenet/images/val/n01484850", fake_imagenet / "elsewhere")
    with pytest.raises(DatasetError, match=r"images/val: found 4/5 class folders; missing: n01484850"):
        build_dataset("imagenet", fake_imagenet)


def test_imagenet_flat_val_folder_gets_the_valprep_hint(fake_imagenet, image_writer):
    import shutil

    shutil.rmtree(fake_imagenet / "imagenet/images/val")
    image_writer(fake_imagenet / "imagenet/images/val/ILSVRC2012_val_00000001.JPEG", fmt="JPEG")
    with pytest.raises(DatasetError, match="valprep"):
        build_dataset("imagenet", fake_imagenet)


def test_split_file_dataset_uses_the_names_in_the_file(fake_caltech):
    root, split = fake_caltech
    splits = build_dataset("Caltech101", root)  # Dassl class name accepted
    assert splits.name == "caltech101"
    image_dir = os.path.join(str(root), "caltech-101", "101_ObjectCategories")
    for part in ("train", "val", "test"):
        got = [(s.path, s.label, s.classname) for s in getattr(splits, part)]
        assert got == [(os.path.join(image_dir, p), label, name) for p, label, name in split[part]]
    # Names from the file, "_" read as a space; no renaming rule applied on top.
    assert splits.classnames == ("face", "leopard", "accordion", "water lilly")
    assert splits.template == "a photo of a {}."
    assert splits.prompts()[3] == "a photo of a water lilly."


def test_split_file_naming_a_missing_image_fails_with_its_name(fake_caltech):
    root, _ = fake_caltech
    os.remove(root / "caltech-101/101_ObjectCategories/Leopards/image_0002.jpg")
    with pytest.raises(DatasetError, match=r"names 1 files that do not exist: .*Leopards/image_0002.jpg"):
        build_dataset("caltech101", root)
    assert len(build_dataset("caltech101", root, verify_files=False).train) == 16


def test_missing_split_file_explains_and_generation_is_opt_in(fake_caltech):
    root, _ = fake_caltech
    os.remove(root / "caltech-101/split_zhou_Caltech101.json")
    with pytest.raises(DatasetError,
                       match=r"split_zhou_Caltech101.json.*dataset.generate_split=true \(generate_split=True"):
        build_dataset("caltech101", root)
    generated = build_dataset("caltech101", root, generate_split=True, split_seed=3)
    # CoOp's raw rules: sorted folders, renames applied; 6 images per class -> 3/1/2 (50/20/30, rounded).
    assert generated.classnames == ("face", "leopard", "accordion", "water lilly")
    assert (len(generated.train), len(generated.val), len(generated.test)) == (12, 4, 8)
    again = build_dataset("caltech101", root, generate_split=True, split_seed=3)
    assert generated.train == again.train
    assert not (root / "caltech-101/split_zhou_Caltech101.json").exists()  # never written back


def test_a_root_that_is_the_dataset_folder_itself_is_named_with_the_root_to_give(fake_caltech, fake_imagenet, tmp_path):
    root, _ = fake_caltech
    # Named like the dataset's folder, or holding its image folder and split file under another name.
    renamed = tmp_path / "my caltech copy"
    os.rename(root / "caltech-101", renamed)
    for given, parent in ((fake_imagenet / "imagenet", fake_imagenet), (renamed, tmp_path)):
        name = "imagenet" if parent == fake_imagenet else "caltech101"
        folder = "imagenet" if parent == fake_imagenet else "caltech-101"
        hint = (f"--root is the folder that holds {folder}/, and {given} looks like {folder}/ itself: "
                f"give --root {parent}")
        with pytest.raises(DatasetError) as error:
            build_dataset(name, given)
        assert str(error.value).endswith(f"{given / folder} is not a folder; {hint}")
        problem = check_layout(name, given).problems[0]
        assert problem == f"dataset folder {given / folder} does not exist; {hint}"
    # A root that looks like nothing of the dataset: the usual pointer to `prepare`.
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DatasetError, match=r"is not a folder; run `fastprompt prepare caltech101 --root <root>`"):
        build_dataset("caltech101", tmp_path / "elsewhere")


def test_stanford_cars_paths_are_relative_to_the_dataset_folder(tmp_path, image_writer):
    dataset_dir = tmp_path / "stanford_cars"
    entries = {
        "train": [["cars_train/00001.jpg", 0, "2012 Tesla Model S Sedan"]],
        "val": [["cars_train/00002.jpg", 1, "2007 Volvo 240 Sedan"]],
        "test": [["cars_test/00001.jpg", 0, "2012 Tesla Model S Sedan"]],
    }
    for part in entries.values():
        image_writer(dataset_dir / part[0][0], fmt="JPEG")
    (dataset_dir / "split_zhou_StanfordCars.json").write_text(json.dumps(entries))
    splits = build_dataset("stanford_cars", tmp_path)
    assert splits.test[0].path == os.path.join(str(dataset_dir), "cars_test", "00001.jpg")
    assert splits.classnames == ("2012 Tesla Model S Sedan", "2007 Volvo 240 Sedan")


def test_malformed_split_file_names_the_entry(tmp_path):
    dataset_dir = tmp_path / "dtd"
    (dataset_dir / "images").mkdir(parents=True)
    (dataset_dir / "split_zhou_DescribableTextures.json").write_text(
        json.dumps({"train": [["a.jpg", 0]], "val": [], "test": []})
    )
    with pytest.raises(DatasetError, match=r"train\[0\].*not \[path, label, classname\]"):
        build_dataset("dtd", tmp_path)


def test_templates_per_dataset(tmp_path):
    from fastprompt.data import DATASET_TEMPLATES, benchmark_info

    assert benchmark_info("eurosat").template == "a centered satellite photo of {}."
    assert benchmark_info("DescribableTextures").template == "{} texture."
    assert DATASET_TEMPLATES["food101"] == "a photo of {}, a type of food."
    assert DATASET_TEMPLATES["ucf101"] == "a photo of a person doing {}."


def test_aircraft_reads_the_variant_lists(tmp_path, image_writer):
    dataset_dir = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "F/A-18"]
    dataset_dir.mkdir()
    (dataset_dir / "variants.txt").write_text("\n".join(variants) + "\n")
    lines = {"train": ["0034309 707-320", "0034958 F/A-18"], "val": ["0037511 A300B4"], "test": ["1102468 F/A-18"]}
    for split, rows in lines.items():
        (dataset_dir / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
        for row in rows:
            image_writer(dataset_dir / "images" / f"{row.split()[0]}.jpg", fmt="JPEG")
    splits = build_dataset("fgvc_aircraft", tmp_path)
    assert splits.classnames == tuple(variants)
    assert [(os.path.basename(s.path), s.label) for s in splits.train] == [("0034309.jpg", 0), ("0034958.jpg", 2)]
    assert splits.template == "a photo of a {}, a type of aircraft."


def test_imagenet_a_uses_only_its_200_classes(fake_imagenet_a):
    root, names = fake_imagenet_a
    splits = build_dataset("imagenet_a", root)
    assert splits.class_ids == IMAGENET_A_WNIDS and splits.num_classes == 200
    assert splits.classnames == tuple(names[w] for w in IMAGENET_A_WNIDS)
    assert "tench" not in splits.classnames  # named in classnames.txt, not an ImageNet-A class
    assert [s.label for s in splits.test] == list(range(200)) and not splits.train


def test_imagenet_a_missing_class_folder_is_named(fake_imagenet_a):
    import shutil

    root, _ = fake_imagenet_a
    shutil.rmtree(root / "imagenet-adversarial/imagenet-a" / IMAGENET_A_WNIDS[7])
    with pytest.raises(DatasetError, match=f"found 199/200 class folders; missing: {IMAGENET_A_WNIDS[7]}"):
        build_dataset("imagenet-a", root)
    assert build_dataset("imagenet-a", root, check_classes=False).num_classes == 199


def test_imagenet_r_and_sketch_and_v2_layouts(tmp_path, image_writer, classnames_writer, imagenet_names):
    names = imagenet_names
    r_names = {w: f"name of {w}" for w in sorted(set(IMAGENET_R_WNIDS) | set(names))}
    classnames_writer(tmp_path / "imagenet-rendition/classnames.txt", r_names)
    for wnid in IMAGENET_R_WNIDS:
        image_writer(tmp_path / "imagenet-rendition/imagenet-r" / wnid / "art_0.jpg", fmt="JPEG")
    r = build_dataset("imagenet_r", tmp_path)
    assert r.class_ids == IMAGENET_R_WNIDS and r.template == "a photo of a {}."
    assert r.classnames == tuple(r_names[w] for w in IMAGENET_R_WNIDS)

    classnames_writer(tmp_path / "imagenet-sketch/classnames.txt", names)
    for wnid in names:
        image_writer(tmp_path / "imagenet-sketch/images" / wnid / "sketch_0.JPEG", fmt="JPEG")
    sketch = build_dataset("ImageNetSketch", tmp_path)
    assert sketch.classnames == tuple(names[w] for w in sorted(names))

    # ImageNetV2: folder i holds class i of classnames.txt (file order).
    classnames_writer(tmp_path / "imagenetv2/classnames.txt", names)
    for label in range(len(names)):
        image_writer(
            tmp_path / "imagenetv2/imagenetv2-matched-frequency-format-val" / str(label) / "a.jpeg", fmt="JPEG"
        )
    v2 = build_dataset("imagenetv2", tmp_path)
    assert [(os.path.basename(os.path.dirname(s.path)), s.label, s.classname) for s in v2.test] == [
        (str(i), i, name) for i, name in enumerate(names.values())
    ]


@pytest.mark.parametrize("name, option, value, expected", [
    ("procedural", "num_test_per_class", "abc", "int"),
    ("procedural", "num_classes", 2.5, "int"),
    ("procedural", "seed", True, "int"),
    ("dtd", "verify_files", "no", "bool"),
    ("imagefolder", "val_fraction", "0.2", "float"),
    ("csv", "name", 3, "str | None"),
])
def test_an_option_of_the_wrong_type_is_named_before_anything_is_read(tmp_path, name, option, value, expected):
    root = None if name == "procedural" else tmp_path / "absent"  # the types are checked before the root
    if name == "dtd":
        root = tmp_path
    with pytest.raises(DatasetError) as error:
        build_dataset(name, root, **{option: value})
    assert str(error.value) == (f"dataset {name!r} option {option}={value!r} is of type {type(value).__name__};"
                                f" expected {expected}")


def test_numpy_option_values_are_python_numbers():
    splits = build_dataset("procedural", num_train_per_class=np.int64(1), num_val_per_class=np.int64(1),
                           num_test_per_class=np.int64(1), num_classes=np.int64(2), image_size=np.int64(32))
    assert len(splits.train) == 2 and len(splits.classnames) == 2 and len(splits.test) == 2


def test_unknown_dataset_name_lists_the_known_ones():
    with pytest.raises(DatasetError) as error:
        build_dataset("imagenett", "/nonexistent")
    message = str(error.value)
    assert "unknown dataset 'imagenett'" in message and "Did you mean 'imagenet'" in message
    for name in ("caltech101", "ucf101", "imagenet_r", "procedural", "csv"):
        assert name in message
    assert set(known_dataset_names()) >= {"eurosat", "imagenet_sketch", "imagefolder"}
    assert resolve_dataset_name("OxfordFlowers") == resolve_dataset_name("flowers102") == "oxford_flowers"


def test_unknown_option_and_missing_root_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="dataset 'dtd' does not take option 'shots'; its options: generate_split,"):
        build_dataset("dtd", tmp_path, shots=4)
    with pytest.raises(DatasetError, match="does not take option 'split_sed'; did you mean 'split_seed'\\? Its options: generate_split,"):
        build_dataset("dtd", tmp_path, split_sed=4)
    with pytest.raises(DatasetError, match="needs a root folder"):
        build_dataset("dtd")
    with pytest.raises(DatasetError, match="dtd dataset folder|DescribableTextures dataset folder"):
        build_dataset("dtd", tmp_path)
    assert dataset_options("dtd") == ["generate_split", "split_seed", "verify_files"]


def test_published_wnid_subsets_are_200_sorted_distinct_imagenet_ids():
    for wnids in (IMAGENET_A_WNIDS, IMAGENET_R_WNIDS):
        assert len(wnids) == len(set(wnids)) == 200 and list(wnids) == sorted(wnids)
        assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    assert len(set(IMAGENET_A_WNIDS) & set(IMAGENET_R_WNIDS)) < 200  # two different subsets
