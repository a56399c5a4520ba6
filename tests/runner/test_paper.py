"""The papers' figures (fastprompt.runner.paper) and `report --paper`.

The transcribed figures are checked against the sources' own arithmetic: every Average row is the mean of its
datasets (to the 0.01 the tables print) and every base-to-novel HM is 2BN/(B+N) of its row, except the two places
where the printed sources disagree with themselves (named in the module). The comparison is checked on runs made
of the papers' own per-dataset numbers, whose differences must be zero and whose Average must be the paper's."""

import statistics

import pytest

from fastprompt.runner.paper import B2N, B2N_AVERAGES, DG, FEWSHOT, XD, paper_comparison
from fastprompt.runner.results import harmonic_mean, summarize_run

SOURCE_INCONSISTENCIES = {("b2n-hm", "mmrl", "dtd"), ("fewshot-average", "maple", 2)}  # (check, method, where)


def test_averages_are_the_means_of_the_datasets():
    for method, rows in B2N.items():
        datasets = [v for k, v in rows.items() if k != "average"]
        assert len(datasets) == 11
        for i in (0, 1):  # base, novel: plain means; the Average HM is the HM of those means
            assert statistics.fmean(r[i] for r in datasets) == pytest.approx(rows["average"][i], abs=0.006), method
        assert harmonic_mean(*rows["average"][:2]) == pytest.approx(rows["average"][2], abs=0.006), method
        for dataset, (base, novel, hm) in rows.items():
            if ("b2n-hm", method, dataset) not in SOURCE_INCONSISTENCIES:
                assert harmonic_mean(base, novel) == pytest.approx(hm, abs=0.006), (method, dataset)
    for method, rows in FEWSHOT.items():
        datasets = [v for k, v in rows.items() if k != "average"]
        for k in range(5):
            mean = statistics.fmean(r[k] for r in datasets)
            if ("fewshot-average", method, k) in SOURCE_INCONSISTENCIES:
                assert mean == pytest.approx(75.75, abs=0.01) and rows["average"][k] == 75.37
            else:
                assert mean == pytest.approx(rows["average"][k], abs=0.006), (method, k)
    for method, row in XD.items():
        targets = [v for k, v in row.items() if k not in ("imagenet", "average")]
        assert len(targets) == 10 and statistics.fmean(targets) == pytest.approx(row["average"], abs=0.006), method
    for method, (base, novel, hm) in B2N_AVERAGES.items():
        assert harmonic_mean(base, novel) == pytest.approx(hm, abs=0.006), method
    assert set(DG["maple"]) == {"imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}


def b2n_run(method, dataset, base, novel, backbone="ViT-B-16", pretrained="openai", shots=16):
    summary = summarize_run("b2n", f"{method} {dataset}", [{"seed": s, "targets": [
        {"dataset": dataset, "subset": "base", "mode": "base", "accuracy": base, "macro_f1": 0.0},
        {"dataset": dataset, "subset": "novel", "mode": "novel", "accuracy": novel, "macro_f1": 0.0}]}
        for s in (1, 2, 3)])
    summary["config"] = {"method": method, "backbone": backbone, "pretrained": pretrained, "shots": shots}
    return summary


def test_runs_equal_to_the_paper_differ_by_zero_and_average_to_the_papers_average():
    runs = [b2n_run("maple", d, b, n) for d, (b, n, _) in B2N["maple"].items() if d != "average"]
    text = paper_comparison(runs)
    assert "| maple eurosat | eurosat | 94.07 (94.07, +0.00) | 73.23 (73.23, +0.00) | 82.35 (82.35, +0.00) |" in text
    assert "| **Average maple** | 11 datasets | 82.28 (82.28, +0.00) | 75.14 (75.14, +0.00) |" in text
    assert "Paper figures: MMRL Table 1" in text and "Δ = this run − the paper" in text


def test_differences_not_comparable_runs_and_missing_figures_are_said():
    runs = [b2n_run("coop", "dtd", 80.44, 40.18),                     # 1 above, 1 below the paper
            b2n_run("coop", "eurosat", 90.0, 50.0, backbone="tiny", pretrained=None),
            b2n_run("mpl", "dtd", 80.0, 60.0),
            b2n_run("vpt_deep", "dtd", 80.0, 60.0)]
    text = paper_comparison(runs)
    assert "| coop dtd | dtd | 80.44 (79.44, +1.00) | 40.18 (41.18, -1.00) |" in text
    assert "coop eurosat" not in text.split("\n\n")[0]  # left out of the table ...
    assert "Not compared: coop eurosat (backbone tiny, weights random; the figures are for ViT-B-16 with openai" \
           " weights, 16 shots)." in text  # ... and said why
    assert "| mpl dtd | dtd | 80.00 (–) | 60.00 (–) |" in text and "No per-dataset figures of mpl on b2n." in text
    assert "No Average for coop: the papers average all 11 datasets (10 not run)." in text
    # vpt_deep has a published average only: one dataset is not enough for it either.
    assert "No Average for vpt_deep" in text


def test_few_shot_and_transfer_rows():
    few = summarize_run("fewshot", "coop dtd", [{"seed": 1, "targets": [
        {"dataset": "dtd", "subset": "all", "mode": "base", "accuracy": 60.0, "macro_f1": 0.0}]}])
    few["config"] = {"method": "coop", "backbone": "ViT-B-16", "pretrained": "openai", "shots": 4}
    assert "| coop dtd | dtd | 4 | 60.00 (58.70, +1.30) |" in paper_comparison([few])
    xd = summarize_run("xd", "maple imagenet", [{"seed": 1, "targets": [
        {"dataset": d, "subset": "all", "mode": "novel", "accuracy": v, "macro_f1": 0.0}
        for d, v in XD["maple"].items() if d != "average"]}])
    xd["config"] = {"method": "maple", "backbone": "ViT-B-16", "pretrained": "openai", "shots": 16}
    text = paper_comparison([xd])
    assert "| maple imagenet | imagenet (source) | 70.72 (70.72, +0.00) |" in text
    assert "| maple imagenet | dtd (target) | 46.49 (46.49, +0.00) |" in text
    assert "| **maple imagenet** | Average (targets) | 66.30 (66.30, +0.00) |" in text


def test_report_paper_flag(tmp_path, cli):
    """`report --paper` on real run folders of the tiny backbone: the table, then why nothing was compared."""
    from runner_support import FAST, PROCEDURAL

    run = tmp_path / "run"
    code, _, err = cli("train", "--method", "coop", "--shots", "2", "--seeds", "1", *FAST, *PROCEDURAL,
                       "epochs=1", "warmup_epochs=0", f"output_dir={run}")
    assert code == 0, err
    code, out, err = cli("report", run, "--paper")
    assert code == 0, err
    assert "| coop procedural |" in out
    assert "No run here ran the papers' setting. Not compared: coop procedural (backbone tiny, weights random," \
           " 2 shots;" in out


def test_a_run_that_changed_its_paper_preset_is_compared_with_the_change_named():
    from fastprompt.runner.config import resolve_config

    def config(**changes):
        values = {"method": "coop", "protocol": "b2n", "dataset": "dtd", "shots": "16", "device": "cpu",
                  "root": "/data", "seeds": "1", **changes}  # device, root, seeds: not training changes
        return resolve_config({}, values).config.to_dict()

    run = b2n_run("coop", "dtd", 79.44, 41.18)
    run["config"] = config(epochs="10", n_ctx="4")
    text = paper_comparison([run])
    assert "| coop dtd | dtd | 79.44 (79.44, +0.00) |" in text
    assert "Compared though it changed its paper preset: coop dtd (epochs 200 -> 10, n_ctx 16 -> 4)." in text
    run["config"] = config()
    assert "changed its paper preset" not in paper_comparison([run])
    assert "seeds" not in paper_comparison([run])  # 3 seeds, as the papers


def test_fewer_seeds_than_the_papers_are_noted():
    one = summarize_run("b2n", "maple dtd", [{"seed": 1, "targets": [
        {"dataset": "dtd", "subset": "base", "mode": "base", "accuracy": 80.0, "macro_f1": 0.0},
        {"dataset": "dtd", "subset": "novel", "mode": "novel", "accuracy": 60.0, "macro_f1": 0.0}]}])
    one["config"] = {"method": "maple", "backbone": "ViT-B-16", "pretrained": "openai", "shots": 16}
    assert "The papers average 3 seeds; maple dtd has 1." in paper_comparison([one])


@pytest.mark.parametrize("protocol", ["b2n", "xd", "dg", "fewshot"])
def test_each_preset_as_resolved_has_no_changes_from_itself(protocol):
    from fastprompt.cli import METHOD_NAMES
    from fastprompt.runner.config import resolve_config
    from fastprompt.runner.paper import preset_changes

    for method in METHOD_NAMES:
        for dataset in ("imagenet", "eurosat") if protocol in ("b2n", "fewshot") else ("imagenet",):
            config = resolve_config({}, {"method": method, "protocol": protocol, "dataset": dataset,
                                         "shots": "16"}).config.to_dict()
            assert preset_changes(config) == [], (method, protocol, dataset)


def test_the_quickgelu_name_of_the_paper_backbone_is_compared_and_another_backbone_is_not():
    """ViT-B-16-quickgelu with OpenAI's weights is the papers' model (the plain name builds it the same way); RN50
    is another backbone."""
    runs = [b2n_run("coop", "dtd", 80.44, 40.18, backbone="ViT-B-16-quickgelu"),
            b2n_run("coop", "eurosat", 80.0, 50.0, backbone="RN50")]
    text = paper_comparison(runs)
    assert "| coop dtd | dtd | 80.44 (79.44, +1.00) | 40.18 (41.18, -1.00) |" in text
    assert "Not compared: coop eurosat (backbone RN50; the figures are for ViT-B-16 with openai" in text
