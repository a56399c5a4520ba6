"""Train + eval through the CLI: three methods on the embedded procedural set, and on-disk fakes of two real
layouts (EuroSAT's split_zhou JSON, ImageNet's class folders), base-to-novel with HM, cross-dataset,
few-shot, two seeds aggregated into Markdown/CSV tables, eval reproducing the logged accuracy (in-process
and through a subprocess), and MMRL's decoupled inference checked against its two heads computed by hand."""

import csv
import io
import os
import statistics
import subprocess
import sys

import pytest
import torch

import fastprompt

from fastprompt.cli import main
from fastprompt.data import build_dataset, eval_transform, sample_few_shot, subsample_classes
from fastprompt.runner import Predictor
from fastprompt.runner.results import harmonic_mean
from runner_support import FAST, PROCEDURAL, build_eurosat, build_imagenet, read_json

B2N_METHODS = ("coop", "maple", "mmrl")


def train(*args):
    code = main(["train", *[str(a) for a in args]])
    assert code == 0
    return code


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """b2n runs with seeds 1 and 2: coop, maple, mmrl on procedural, maple on the fake EuroSAT."""
    base = tmp_path_factory.mktemp("runs")
    root = base / "data"
    build_eurosat(root)
    out = {}
    for method in B2N_METHODS:
        out[method] = base / f"{method}-procedural"
        train("--method", method, *PROCEDURAL, "--shots", 2, "--seeds", "1,2", *FAST, "epochs=2", "batch_size=4",
              f"output_dir={out[method]}")
    out["eurosat"] = base / "maple-eurosat"
    train("--method", "maple", "--dataset", "eurosat", "--root", root, "--shots", 2, "--seeds", "1,2", *FAST,
          "epochs=2", "batch_size=2", f"output_dir={out['eurosat']}")
    out["root"] = root
    return out


@pytest.mark.parametrize("method", B2N_METHODS)
def test_b2n_run_aggregates_two_seeds_with_hm(runs, method):
    run = runs[method]
    manifest = read_json(run / "run.json")
    assert manifest["status"] == "complete" and manifest["config"]["method"] == method
    assert set(manifest["splits"]) == {"1", "2"} and len(manifest["splits"]["1"]["train"]["sha256"]) == 64
    assert manifest["environment"]["versions"]["torch"] == torch.__version__
    seeds = [read_json(run / f"seed{s}" / "results.json") for s in (1, 2)]
    for result in seeds:
        assert [(t["subset"], t["mode"], t["classes"]) for t in result["targets"]] == [
            ("base", "base", 4), ("novel", "novel", 4)]
        assert [h["epoch"] for h in result["history"]] == [1, 2] and result["history"][0]["lr"] == 1e-5
        assert not (run / f"seed{result['seed']}" / "state").exists()  # resumable state removed once complete
    summary = read_json(run / "summary.json")
    base = [r["targets"][0]["accuracy"] for r in seeds]
    novel = [r["targets"][1]["accuracy"] for r in seeds]
    assert summary["b2n"]["base"] == pytest.approx([statistics.fmean(base), statistics.stdev(base)])
    assert summary["b2n"]["novel"] == pytest.approx([statistics.fmean(novel), statistics.stdev(novel)])
    assert summary["b2n"]["hm"] == pytest.approx(harmonic_mean(statistics.fmean(base), statistics.fmean(novel)))
    rows = list(csv.reader(io.StringIO((run / "summary.csv").read_text())))
    assert rows[1][:3] == [f"{method} procedural", "procedural", "2"]
    assert float(rows[1][-1]) == pytest.approx(summary["b2n"]["hm"], abs=1e-4)
    assert f"| {method} procedural | procedural | 2 |" in (run / "summary.md").read_text()


def test_eval_reproduces_the_logged_accuracy(runs, cli):
    code, out, err = cli("eval", "--run", runs["maple"])
    assert code == 0, err
    assert "largest difference from the accuracy logged at training time: 0.0000 points" in out


def test_eval_on_another_class_set_uses_novel_mode_and_writes_json(runs, cli, tmp_path):
    output = tmp_path / "eval.json"
    code, out, err = cli("eval", "--checkpoint", runs["coop"] / "seed1", "--dataset", "procedural", "--subset",
                         "novel", "--output", output, "dataset.num_test_per_class=2")
    assert code == 0, err
    (record,) = read_json(output)["evaluations"][0]["targets"]
    assert (record["subset"], record["mode"], record["classes"], record["images"]) == ("novel", "novel", 4, 8)
    logged = read_json(runs["coop"] / "seed1" / "results.json")["targets"][1]
    assert record["accuracy"] == logged["accuracy"]


def test_eval_checkpoint_of_a_run_folder_evaluates_each_seed(runs, cli, tmp_path):
    """--checkpoint RUN (a run folder, not a seed's checkpoint) stands for its seeds' checkpoints, in seed order."""
    output = tmp_path / "eval.json"
    code, out, err = cli("eval", "--checkpoint", runs["coop"], "--dataset", "procedural", "--subset", "novel",
                         "--output", output, "dataset.num_test_per_class=2")
    assert code == 0, err
    evaluations = read_json(output)["evaluations"]
    assert [e["checkpoint"] for e in evaluations] == [str(runs["coop"] / "seed1"), str(runs["coop"] / "seed2")]
    for seed, evaluation in zip((1, 2), evaluations, strict=True):
        logged = read_json(runs["coop"] / f"seed{seed}" / "results.json")["targets"][1]
        assert evaluation["targets"][0]["accuracy"] == logged["accuracy"]


@pytest.mark.parametrize("value, message", [
    ("devcie=cpu", "unknown key 'devcie'; did you mean 'device'? (eval takes only device, precision,"),
    ("lr=0.1", "eval cannot change lr (eval takes only device, precision,"),
    ("n_ctx=4", "eval cannot change n_ctx (eval takes only"),
])
def test_eval_refuses_keys_it_cannot_change_in_one_line(runs, cli, value, message):
    code, out, err = cli("eval", runs["coop"], value)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert "evaluating" not in out  # refused before any checkpoint loads


def test_mmrl_decoupled_inference_matches_its_heads(runs):
    """Base accuracy = the paper's fusion alpha*p(z_c) + (1-alpha)*p(z_r); novel accuracy = z_c only (METHODS.md §3.7)."""
    seed_dir = runs["mmrl"] / "seed1"
    logged = {t["subset"]: t["accuracy"] for t in read_json(seed_dir / "results.json")["targets"]}
    full = build_dataset("procedural", image_size=32, num_test_per_class=2, num_val_per_class=1)
    splits = sample_few_shot(full, 2, 1)
    predictor = Predictor(str(seed_dir))
    model, alpha = predictor.model, predictor.model.method.alpha
    for subset in ("base", "novel"):
        part = subsample_classes(splits, subset)
        model.set_classnames(part.classnames)
        dataset = part.dataset("test", eval_transform(32))
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        with torch.no_grad():
            out = model(images)
        main_head, rep_head = out.logits["main"], out.logits["rep"]
        fused = alpha * main_head.softmax(-1) + (1 - alpha) * rep_head.softmax(-1)
        logits = fused if subset == "base" else main_head
        assert (logits.argmax(-1) == labels).float().mean().item() * 100 == pytest.approx(logged[subset])


def test_report_averages_datasets(runs, cli, tmp_path):
    markdown, table = tmp_path / "t.md", tmp_path / "t.csv"
    code, out, err = cli("report", runs["maple"], runs["eurosat"], "--markdown", markdown, "--csv", table)
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(table.read_text())))
    procedural, eurosat, average = rows[1], rows[2], rows[3]
    assert eurosat[1] == "eurosat" and average[0] == "Average"
    base = (float(procedural[3]) + float(eurosat[3])) / 2
    novel = (float(procedural[5]) + float(eurosat[5])) / 2
    assert float(average[3]) == pytest.approx(base, abs=1e-3) and float(average[5]) == pytest.approx(novel, abs=1e-3)
    assert float(average[7]) == pytest.approx(harmonic_mean(base, novel), abs=1e-3)
    assert "**Average**" in markdown.read_text() and markdown.read_text() in out


def test_eurosat_split_file_run_and_eval_in_a_subprocess(runs):
    run = runs["eurosat"]
    seed = read_json(run / "seed1" / "results.json")
    assert [(t["dataset"], t["subset"], t["classes"]) for t in seed["targets"]] == [
        ("eurosat", "base", 2), ("eurosat", "novel", 2)]
    assert os.path.isfile(runs["root"] / "eurosat" / "split_fewshot" / "shot_2-seed_1.json")  # Dassl cache, JSON
    command = [sys.executable, "-m", "fastprompt.cli", "eval", "--run", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest._one_thread
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert "largest difference from the accuracy logged at training time: 0.0000 points" in done.stdout
    assert "| maple eurosat | eurosat | 2 |" in done.stdout


def test_cross_dataset_imagenet_to_eurosat_with_mmrl(tmp_path, cli):
    root = tmp_path / "data"
    build_imagenet(root)
    build_eurosat(root)
    run = tmp_path / "xd"
    code, out, err = cli("train", "--method", "mmrl", "--protocol", "xd", "--dataset", "imagenet", "--root", root,
                         "--shots", 2, "--seeds", 1, "targets=eurosat", *FAST, "batch_size=4", f"output_dir={run}")
    assert code == 0, err
    targets = read_json(run / "seed1" / "results.json")["targets"]
    found = [(t["dataset"], t["mode"], t["classes"]) for t in targets]
    assert found == [("imagenet", "base", 4), ("eurosat", "novel", 4)]
    manifest = read_json(run / "seed1" / "checkpoint.json")
    # MMRL's frozen text input is the dataset template; xd preset: 1 epoch, no warm-up, lambda 0.2.
    # Every option is recorded, the defaults too, so a later default cannot change what the checkpoint means.
    assert manifest["options"] == {**fastprompt.method_options("mmrl"), "reg_weight": 0.2,
                                   "template": "a photo of a {}."}
    assert manifest["options"]["alpha"] == 0.7
    assert read_json(run / "seed1" / "results.json")["history"][0]["lr"] == 1e-3
    assert "| mmrl imagenet | 1 |" in out and "Average (targets)" in out


def test_few_shot_with_the_training_set_on_the_device(tmp_path, cli):
    root = tmp_path / "data"
    build_imagenet(root)
    run = tmp_path / "fs"
    code, out, err = cli("train", "--method", "coop", "--protocol", "fewshot", "--dataset", "imagenet", "--root", root,
                         "--shots", 2, "--seeds", 3, *FAST, "epochs=2", "batch_size=4", "n_ctx=4",
                         "data_on_device=true", f"output_dir={run}")
    assert code == 0, err
    assert "few-shot set on cpu: 8 images" in out and "augmented there by torchvision's ops, image by image" in out
    (target,) = read_json(run / "seed3" / "results.json")["targets"]
    assert (target["dataset"], target["subset"], target["mode"], target["images"]) == ("imagenet", "all", "base", 8)
    assert "| coop imagenet | imagenet | 1 |" in (run / "summary.md").read_text()


def test_zero_shot_clip_evaluates_with_the_dataset_template_and_trains_nothing(tmp_path, cli, data_root):
    run = tmp_path / "clip"
    code, out, err = cli("train", "--method", "clip", "--dataset", "eurosat", "--root", data_root, "--seeds", 1,
                         *FAST, f"output_dir={run}")
    assert code == 0, err
    manifest = read_json(run / "seed1" / "checkpoint.json")
    assert manifest["tensors"] == {} and manifest["options"] == {**fastprompt.method_options("clip"),
                                                               "template": "a centered satellite photo of {}."}
    results = read_json(run / "seed1" / "results.json")
    assert results["history"] == []  # no training epoch was run
    assert [t["subset"] for t in results["targets"]] == ["base", "novel"]
