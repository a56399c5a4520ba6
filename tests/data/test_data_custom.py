"""Users' own data: ImageFolder (pool or train/val/test folders) and CSV files."""

import json
import os

import pytest

from fastprompt.data import DatasetError, build_dataset, sample_few_shot


def _pool(root, image_writer, classes=("golden_retriever", "tabby_cat", "zebra"), count=10):
    for label, cls in enumerate(classes):
        for k in range(count):
            image_writer(root / cls / f"img_{k:02d}.png", (label * 80, k * 20, 50))
    return root


def test_image_folder_pool_is_split_per_class_reproducibly(tmp_path, image_writer):
    root = _pool(tmp_path / "mine", image_writer)
    splits = build_dataset("imagefolder", root)
    assert splits.classnames == ("golden retriever", "tabby cat", "zebra")
    assert splits.class_ids == ("golden_retriever", "tabby_cat", "zebra")
    # 10 images per class, CoOp's 50/20/30 by default.
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 6, 9)
    everything = sorted(s.path for s in (*splits.train, *splits.val, *splits.test))
    assert everything == sorted(str(p) for p in root.rglob("*.png"))
    assert build_dataset("imagefolder", root).train == splits.train
    assert build_dataset("imagefolder", root, split_seed=2).train != splits.train
    other = build_dataset("imagefolder", root, val_fraction=0.1, test_fraction=0.5)
    assert (len(other.train), len(other.val), len(other.test)) == (12, 3, 15)


def test_image_folder_with_split_folders_and_a_name_mapping(tmp_path, image_writer):
    root = tmp_path / "mine"
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("a_cls", "b_cls"):
            for k in range(count):
                image_writer(root / split / cls / f"{k}.jpg", fmt="JPEG")
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"a_cls": "apple", "b_cls": "banana"}))
    splits = build_dataset("imagefolder", root, classnames=str(mapping), template="a photo of {}, a fruit.")
    assert splits.classnames == ("apple", "banana")
    # A lone val/ is the evaluation split (ImageNet convention).
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 0, 4)
    assert splits.prompts() == ["a photo of apple, a fruit.", "a photo of banana, a fruit."]
    with pytest.raises(DatasetError, match="does not have: cherry"):
        build_dataset("imagefolder", root, classnames={"cherry": "cherry"})
    image_writer(root / "val" / "c_cls" / "0.jpg", fmt="JPEG")
    with pytest.raises(DatasetError, match="class folders that train/ does not: c_cls"):
        build_dataset("imagefolder", root)


def test_csv_with_classnames_and_split_column(tmp_path, image_writer):
    rows = ["path,classname,split"]
    for cls in ("zebra", "aardvark"):
        for k in range(3):
            image_writer(tmp_path / "imgs" / f"{cls}{k}.png")
            rows.append(f"imgs/{cls}{k}.png,{cls},{'train' if k < 2 else 'test'}")
    (tmp_path / "animals.csv").write_text("\n".join(rows) + "\n")
    splits = build_dataset("csv", tmp_path / "animals.csv")
    assert splits.name == "animals"
    assert splits.classnames == ("aardvark", "zebra")  # labels by sorted name
    assert [(os.path.basename(s.path), s.label) for s in splits.test] == [("zebra2.png", 1), ("aardvark2.png", 0)]
    assert len(splits.train) == 4 and splits.val == ()
    image, label = splits.dataset("train")[0]
    assert label == 1 and image.size == (8, 8)


def test_csv_with_labels_needs_names(tmp_path, image_writer):
    lines = ["path,label"] + [f"x{k}.png,{k % 2}" for k in range(10)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="no 'classname' column"):
        build_dataset("csv", tmp_path / "data.csv")
    splits = build_dataset("csv", tmp_path / "data.csv", classnames={"0": "red", "1": "blue"})
    assert splits.classnames == ("red", "blue")
    # 5 per class: round(2.5) = 2 train (Python rounds halves to even, as CoOp's split code does), 1 val, 2 test.
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 2, 4)


@pytest.mark.parametrize(
    "content, message",
    [
        ("file,label\na.png,0\n", "must have a 'path' column"),
        ("path,label\na.png,zero\n", "line 2: label 'zero' is not an integer"),
        ("path,classname,split\na.png,x,holdout\n", "split 'holdout' is not one of"),
        ("path,label,classname\na.png,0,x\nb.png,0,y\n", "label 0 has two class names"),
    ],
)
def test_csv_errors_name_the_line_or_column(tmp_path, content, message):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(DatasetError, match=message):
        build_dataset("csv", tmp_path / "bad.csv")


def _spreadsheet_rows(tmp_path, image_writer):
    """The rows of a small CSV dataset, and its images; a class name holds the separator of some files."""
    rows = [("path", "classname", "split")]
    for cls in ("zebra", "aardvark; brown"):
        for k in range(3):
            name = f"imgs/{cls[:5]}{k}.png"
            image_writer(tmp_path / name)
            rows.append((name, cls, "train" if k < 2 else "test"))
    return rows


def _csv_text(rows, delimiter, newline):
    """CSV text written by hand, quoting a field that holds the delimiter as spreadsheets do."""
    quote = lambda field: f'"{field}"' if delimiter in field else field  # noqa: E731
    return newline.join(delimiter.join(quote(field) for field in row) for row in rows) + newline


# As spreadsheets save CSV: Excel's "CSV UTF-8" puts a byte-order mark first, Excel where the decimal mark is a
# comma separates fields with ';', "Text (Tab delimited)" with tabs; Windows ends lines with CRLF.
@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
@pytest.mark.parametrize("bom, newline", [("", "\n"), ("\ufeff", "\r\n")])
def test_csv_as_spreadsheets_write_it(tmp_path, image_writer, delimiter, bom, newline):
    rows = _spreadsheet_rows(tmp_path, image_writer)
    (tmp_path / "data.csv").write_bytes((bom + _csv_text(rows, delimiter, newline)).encode("utf-8"))
    splits = build_dataset("csv", tmp_path / "data.csv")
    assert splits.classnames == ("aardvark; brown", "zebra")
    expected = [(str(tmp_path / path), 0 if cls.startswith("aardvark") else 1) for path, cls, split in rows[1:]
                if split == "test"]
    assert [(s.path, s.label) for s in splits.test] == expected
    assert len(splits.train) == 4


def test_csv_with_paths_written_on_windows(tmp_path, image_writer):
    rows = _spreadsheet_rows(tmp_path, image_writer)
    windows = [rows[0]] + [(path.replace("/", "\\"), cls, split) for path, cls, split in rows[1:]]
    (tmp_path / "data.csv").write_text(_csv_text(windows, ",", "\n"))
    splits = build_dataset("csv", tmp_path / "data.csv")
    assert sorted(s.path for s in (*splits.train, *splits.test)) == sorted(str(tmp_path / row[0]) for row in rows[1:])
    # A POSIX name may hold a backslash: a file so named is the one taken.
    image_writer(tmp_path / "imgs\\zebra0.png")
    assert str(tmp_path / "imgs\\zebra0.png") in [s.path for s in build_dataset("csv", tmp_path / "data.csv").train]


def test_csv_in_another_encoding_is_refused_with_its_line(tmp_path, image_writer):
    rows = _spreadsheet_rows(tmp_path, image_writer) + [("imgs/zebra0.png", "zèbre", "train")]
    (tmp_path / "data.csv").write_bytes(_csv_text(rows, ",", "\r\n").encode("cp1252"))
    with pytest.raises(DatasetError, match=r"data.csv, line 8: the CSV file is not UTF-8 text \(byte 0xe8\); "
                                           r"save it as UTF-8$"):
        build_dataset("csv", tmp_path / "data.csv")


def test_name_mapping_file_with_a_byte_order_mark(tmp_path, image_writer):
    root = _pool(tmp_path / "mine", image_writer, classes=("a_cls", "b_cls"), count=4)
    mapping = tmp_path / "names.json"
    mapping.write_bytes(("\ufeff" + json.dumps({"a_cls": "äpple", "b_cls": "banana"})).encode("utf-8"))
    assert build_dataset("imagefolder", root, classnames=str(mapping)).classnames == ("äpple", "banana")


def test_custom_data_few_shot_caches_only_where_asked(tmp_path, image_writer):
    root = _pool(tmp_path / "mine", image_writer)
    sampled = sample_few_shot(build_dataset("imagefolder", root), 2, 1)
    assert len(sampled.train) == 6
    assert not (root / "split_fewshot").exists()  # never written into the user's class folders
    cache_dir = tmp_path / "cache"
    again = sample_few_shot(build_dataset("imagefolder", root, fewshot_dir=str(cache_dir)), 2, 1)
    assert again.train == sampled.train and (cache_dir / "shot_2-seed_1.json").is_file()
