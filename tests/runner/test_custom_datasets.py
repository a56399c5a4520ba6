"""A user's own data through the CLI: `--dataset imagefolder --root <class-folder tree>` and `--dataset csv --root
<file.csv>` (fastprompt.data.build_dataset's roots). The runner used to require every root to be a folder, so a CSV
dataset could not be trained at all ("dataset root x.csv does not exist")."""

import json

import pytest

from runner_support import COLOURS, FAST, write_image

CLASSES = ["red fox", "green frog", "blue jay"]
ARGS = ["--method", "coop", "--protocol", "fewshot", "--shots", "2", "--seeds", "1", *FAST, "n_ctx=2",
        "batch_size=2", "epochs=2", "warmup_epochs=0"]


@pytest.fixture
def own_data(tmp_path):
    """The same images twice: as <root>/{train,test}/<class>/ folders and as a CSV with a split column."""
    root = tmp_path / "folders"
    rows = ["path,classname,split"]
    for label, name in enumerate(CLASSES):
        for split, count in (("train", 3), ("test", 2)):
            for k in range(count):
                relative = f"{split}/{name}/{k}.png"
                write_image(root / relative, COLOURS[label], seed=label * 10 + k + (5 if split == "test" else 0))
                rows.append(f"folders/{relative},{name},{split}")
    table = tmp_path / "images.csv"
    table.write_text("\n".join(rows) + "\n")
    return root, table


def _results(folder) -> dict:
    return json.loads((folder / "seed1" / "results.json").read_text())["targets"][0]


def test_imagefolder_and_csv_of_the_same_images_train_alike(tmp_path, cli, own_data):
    folders, table = own_data
    results = {}
    # dataset.name: the csv loader's own option (build_dataset's `name` parameter took it: a TypeError).
    for dataset, root, extra in (("imagefolder", folders, []), ("csv", table, ["dataset.name=birds"])):
        out = tmp_path / f"run-{dataset}"
        code, _, err = cli("train", "--dataset", dataset, "--root", root, *ARGS, *extra, f"output_dir={out}")
        assert code == 0, err
        results[dataset] = _results(out)
    for target in results.values():
        assert target["images"] == 2 * len(CLASSES)
    assert results["csv"]["dataset"] == "birds"
    # The same classes, images, few-shot draw and seed: the same accuracy.
    assert results["imagefolder"]["accuracy"] == results["csv"]["accuracy"]


@pytest.mark.parametrize("dataset, root, message", [
    ("csv", "folders", "is a folder; for dataset 'csv' it should be the CSV file"),
    ("imagefolder", "images.csv", "is a file; for dataset 'imagefolder' it should be the folder of class folders"),
    ("csv", "absent.csv", "does not exist (root="),
])
def test_a_root_of_the_wrong_kind_is_one_error_line(tmp_path, cli, own_data, dataset, root, message):
    out = tmp_path / "run"
    code, _, err = cli("train", "--dataset", dataset, "--root", tmp_path / root, *ARGS, f"output_dir={out}")
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_a_checkpoint_trained_on_the_procedural_set_evaluates_on_a_dataset_with_a_root(tmp_path, cli, own_data):
    """eval --checkpoint X --dataset D --root R checks R against D, not against the dataset X was trained on (the
    procedural set, which takes no root, as every import-dassl checkpoint records: it refused every root)."""
    folders, table = own_data
    run = tmp_path / "run"
    code, _, err = cli("train", "--dataset", "procedural", *ARGS, "dataset.num_test_per_class=2", f"output_dir={run}")
    assert code == 0, err
    for dataset, root, images in (("imagefolder", folders, 6), ("csv", table, 6)):
        output = tmp_path / f"{dataset}.json"
        code, _, err = cli("eval", "--checkpoint", run / "seed1", "--dataset", dataset, "--root", root, "device=cpu",
                           "--output", output)
        assert code == 0, err
        (target,) = json.loads(output.read_text())["evaluations"][0]["targets"]
        assert (target["dataset"], target["mode"], target["images"]) == (dataset if dataset != "csv" else "images",
                                                                         "novel", images)


def test_a_relative_root_is_kept_absolute_and_the_run_evaluates_from_another_folder(tmp_path, cli, own_data,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("train", "--dataset", "imagefolder", "--root", "folders", *ARGS, "output_dir=run")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["root"] == str(tmp_path / "folders")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = cli("eval", tmp_path / "run", "device=cpu")
    assert code == 0 and "largest difference from the accuracy logged at training time: 0.0000" in out, err


def test_class_specific_prompts_are_refused_where_other_classes_would_be_scored(tmp_path, cli, own_data):
    folders, _ = own_data
    code, _, err = cli("train", "--dataset", "imagefolder", "--root", folders, *ARGS, "--protocol", "b2n",
                       "class_specific=true", "--dry-run")
    assert code == 2 and "class_specific=true trains one context per training class, which protocol b2n" in err
    run = tmp_path / "run"
    code, _, err = cli("train", "--dataset", "procedural", *ARGS, "class_specific=true", f"output_dir={run}")
    assert code == 0, err
    code, _, err = cli("eval", "--checkpoint", run / "seed1", "--dataset", "imagefolder", "--root", folders,
                       "device=cpu")
    assert code == 2 and err.count("\n") == 1 and "so they cannot score the classes of imagefolder" in err, err


def test_classes_with_fewer_images_than_shots_are_named(tmp_path, cli, own_data):
    """Each class has 3 training images: a 4-shot run trains on 3 of each (Dassl's rule) and says so; 2 shots
    says nothing."""
    folders, _ = own_data
    args = [a for a in ARGS if a not in ("--shots", "2")]
    code, out, err = cli("train", "--dataset", "imagefolder", "--root", folders, *args, "--shots", "4",
                         f"output_dir={tmp_path / 'four'}")
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes == ["note: 3 of 3 classes of imagefolder have fewer than 4 training images (fewest: 'blue jay' with"
                     " 3); they train on all they have"], out
    code, out, err = cli("train", "--dataset", "imagefolder", "--root", folders, *ARGS, f"output_dir={tmp_path / 'two'}")
    assert code == 0, err
    assert "fewer than" not in out


def test_duplicate_class_names_are_one_note_per_run_and_in_the_log(tmp_path, cli, recwarn):
    """Folders 'crane bird' and 'crane_bird' name one prompt. The runner builds a model per seed and evaluates per
    target: one note line in the output and the log, not a warning per build."""
    root = tmp_path / "birds"
    for label, name in enumerate(["crane bird", "crane_bird", "heron"]):
        for k in range(3):
            write_image(root / name / f"{k}.png", COLOURS[label], seed=label * 10 + k)
    run = tmp_path / "run"
    args = [a for a in ARGS if a not in ("--seeds", "1")]
    code, out, err = cli("train", "--dataset", "imagefolder", "--root", root, *args, "--seeds", "1,2",
                         "dataset.test_fraction=0.34", f"output_dir={run}")
    assert code == 0, err
    note = ("note: duplicate class names ('crane bird' at positions 0 and 1): their prompts are identical, so they"
            " always score the same and the first wins ties")
    assert [line for line in out.splitlines() if "duplicate class names" in line] == [note]
    assert [line for line in (run / "log.txt").read_text().splitlines() if "duplicate class names" in line] == [note]
    assert not [w for w in recwarn.list if "duplicate class names" in str(w.message)]
    code, out, err = cli("eval", run, "device=cpu")
    assert code == 0, err
    assert [line for line in out.splitlines() if "duplicate class names" in line] == [note]


def _folders_of(tmp_path, classes):
    root = tmp_path / f"{len(classes)}-classes"
    for label, name in enumerate(classes):
        for split in ("train", "test"):
            for k in range(2):
                write_image(root / split / name / f"{k}.png", COLOURS[label], seed=label * 10 + k)
    return root


@pytest.mark.parametrize("classes, protocol, message", [
    # b2n's base half of 2 classes is 1: cross-entropy over one class is 0, so the prompts learnt nothing and
    # both halves scored 100 % (it used to train and report HM 100)
    (CLASSES[:2], "b2n", "the training set of imagefolder holds 1 class (b2n trains on the base half of its classes;"
                         " 3 or more are needed): a classifier needs at least 2 classes"),
    # the novel half of 1 class is empty: it trained, then failed with a traceback when it set no class names
    (CLASSES[:1], "b2n", "protocol b2n splits the classes of imagefolder into a base and a novel half, but it has 1"
                         " class: b2n needs at least 3 (2 base, 1 novel); use protocol=fewshot"),
    (CLASSES[:1], "fewshot", "the training set of imagefolder holds 1 class: a classifier needs at least 2 classes"),
])
def test_too_few_classes_to_learn_from_is_one_error_line_before_the_run_folder(tmp_path, cli, classes, protocol,
                                                                                message):
    out = tmp_path / "run"
    code, _, err = cli("train", "--dataset", "imagefolder", "--root", _folders_of(tmp_path, classes), *ARGS,
                       "--protocol", protocol, f"output_dir={out}")
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_a_single_class_evaluation_is_named_as_scoring_100_percent_whatever_is_learnt(tmp_path, cli, own_data):
    """b2n over 3 classes trains on 2 and evaluates the third (sorted: red fox) alone: a note says its 100 % means nothing, and eval
    on the novel half of a 1-class set is one error line, not a traceback."""
    folders, _ = own_data
    run = tmp_path / "run"
    code, out, err = cli("train", "--dataset", "imagefolder", "--root", folders, *ARGS, "--protocol", "b2n",
                         f"output_dir={run}")
    assert code == 0, err
    assert ("note: imagefolder/novel ('red fox') holds a single class, so its accuracy is 100 % whatever the prompts"
            " learn") in out.splitlines()
    assert json.loads((run / "seed1" / "results.json").read_text())["targets"][1]["accuracy"] == 100.0
    one = _folders_of(tmp_path, CLASSES[:1])
    code, _, err = cli("eval", "--checkpoint", run / "seed1", "--dataset", "imagefolder", "--root", one,
                       "--subset", "novel", "device=cpu")
    assert code == 2 and err.count("\n") == 1 and "imagefolder/novel holds no class to evaluate" in err, err
