"""The aggregation convention of METHODS.md §2, checked against hand arithmetic: HM of the seed-averaged base
and novel accuracies (not the mean of per-seed HMs), dataset averages of B and N with the HM of the averages,
sample standard deviations, and the Markdown/CSV tables carrying those numbers."""

import csv
import io
import statistics

import pytest

from fastprompt.runner.results import (aggregate_seeds, csv_table, harmonic_mean, latex_table, markdown_table,
                                       summarize_run)


def seed(seed, base, novel, dataset="dtd"):
    return {"seed": seed, "targets": [
        {"dataset": dataset, "subset": "base", "mode": "base", "accuracy": base, "macro_f1": base - 1},
        {"dataset": dataset, "subset": "novel", "mode": "novel", "accuracy": novel, "macro_f1": novel - 1},
    ]}


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_b2n_hm_is_of_the_seed_averages_not_the_average_of_hms():
    runs = [seed(1, 90.0, 40.0), seed(2, 70.0, 80.0)]
    summary = summarize_run("b2n", "maple dtd", runs)
    assert summary["b2n"]["base"] == (80.0, pytest.approx(statistics.stdev([90.0, 70.0])))
    assert summary["b2n"]["novel"][0] == 60.0
    assert summary["b2n"]["hm"] == pytest.approx(2 * 80 * 60 / 140)  # 68.57
    mean_of_hms = (harmonic_mean(90, 40) + harmonic_mean(70, 80)) / 2  # 65.00: a different, wrong number
    assert abs(summary["b2n"]["hm"] - mean_of_hms) > 1


def test_single_seed_std_is_zero_and_macro_f1_is_averaged():
    targets = aggregate_seeds([seed(1, 50.0, 30.0)])
    assert targets["dtd/base"]["accuracy"] == (50.0, 0.0)
    assert targets["dtd/novel"]["macro_f1"] == (29.0, 0.0)


def test_dataset_average_row_takes_hm_of_averaged_b_and_n():
    a = summarize_run("b2n", "maple dtd", [seed(1, 90.0, 50.0), seed(2, 80.0, 60.0)])
    b = summarize_run("b2n", "maple eurosat", [seed(1, 60.0, 70.0, "eurosat"), seed(2, 70.0, 90.0, "eurosat")])
    rows = list(csv.reader(io.StringIO(csv_table([a, b]))))
    assert rows[0] == ["Run", "Dataset", "Seeds", "Base", "Base std", "Novel", "Novel std", "HM"]
    average = rows[-1]
    base, novel = (85.0 + 65.0) / 2, (55.0 + 80.0) / 2
    assert average[0] == "Average"
    assert float(average[3]) == pytest.approx(base) and float(average[5]) == pytest.approx(novel)
    assert float(average[7]) == pytest.approx(harmonic_mean(base, novel), abs=1e-4)
    text = markdown_table([a, b])
    assert "| maple dtd | dtd | 2 | 85.00 ± 7.07 | 55.00 ± 7.07 | 66.79 |" in text
    assert f"| **Average** | 2 datasets |  | 75.00 | 67.50 | {harmonic_mean(base, novel):.2f} |" in text


def test_cross_dataset_average_excludes_the_source():
    runs = [{"seed": s, "targets": [
        {"dataset": "imagenet", "subset": "all", "mode": "base", "accuracy": 70.0 + s, "macro_f1": 0.0},
        {"dataset": "dtd", "subset": "all", "mode": "novel", "accuracy": 40.0 + s, "macro_f1": 0.0},
        {"dataset": "eurosat", "subset": "all", "mode": "novel", "accuracy": 50.0 + s, "macro_f1": 0.0},
    ]} for s in (1, 3)]
    summary = summarize_run("xd", "mmrl imagenet", runs)
    rows = list(csv.reader(io.StringIO(csv_table([summary]))))
    assert rows[0][-1] == "Average (targets)"
    assert float(rows[1][-1]) == pytest.approx((42.0 + 52.0) / 2)
    assert "| mmrl imagenet | 2 | 72.00 ± 1.41 | 42.00 ± 1.41 | 52.00 ± 1.41 | 47.00 |" in markdown_table([summary])


def test_tables_refuse_mixed_protocols():
    a = summarize_run("b2n", "x", [seed(1, 1.0, 1.0)])
    b = summarize_run("fewshot", "y", [{"seed": 1, "targets": [
        {"dataset": "dtd", "subset": "all", "mode": "base", "accuracy": 1.0, "macro_f1": 1.0}]}])
    with pytest.raises(ValueError, match="different protocols"):
        markdown_table([a, b])


def test_each_method_gets_its_own_average_and_no_average_counts_a_dataset_twice():
    """`report runs/*-b2n-*` over two methods: one Average row per method (an average over methods means nothing),
    each right after its runs; a method with a dataset in two runs gets no Average row, and the note says why."""
    maple = [summarize_run("b2n", f"maple {d}", [seed(1, base, novel, d)])
             for d, base, novel in (("dtd", 80.0, 60.0), ("eurosat", 90.0, 70.0))]
    coop = [summarize_run("b2n", f"coop {d}", [seed(1, base, novel, d)])
            for d, base, novel in (("dtd", 70.0, 40.0), ("eurosat", 60.0, 50.0))]
    rows = list(csv.reader(io.StringIO(csv_table([maple[0], coop[0], maple[1], coop[1]]))))[1:]
    assert [r[0] for r in rows] == ["maple dtd", "maple eurosat", "Average maple", "coop dtd", "coop eurosat",
                                    "Average coop"]
    assert float(rows[2][3]) == 85.0 and float(rows[2][5]) == 65.0
    assert float(rows[5][3]) == 65.0 and float(rows[5][5]) == 45.0
    assert float(rows[5][7]) == pytest.approx(harmonic_mean(65.0, 45.0), abs=1e-4)

    again = summarize_run("b2n", "maple dtd", [seed(2, 10.0, 10.0)])
    text = markdown_table([*maple, again, *coop])
    assert "Average maple" not in text and "| **Average coop** | 2 datasets |  | 65.00 | 45.00 |" in text
    assert text.rstrip().endswith("No Average row for maple: dtd in more than one run.")
    assert "An Average row averages base and novel over a method's datasets" in text


def test_a_table_without_an_average_row_does_not_describe_one():
    (single,) = [summarize_run("b2n", "maple dtd", [seed(1, 80.0, 60.0)])]
    text = markdown_table([single])
    assert "Average" not in text
    assert text.rstrip().endswith("HM of the seed-averaged base and novel.")


def test_latex_table_is_the_markdown_table_for_a_paper_source():
    """Two datasets of one method, one of them with LaTeX's special characters in its name: escaped cells, ± as
    $\\pm$, and the Average row bold below a rule (the numbers: means and sample stds of the seeds by hand)."""
    runs = [summarize_run("b2n", "maple fgvc_aircraft", [seed(1, 40.0, 30.0, "fgvc_aircraft"),
                                                          seed(2, 42.0, 34.0, "fgvc_aircraft")]),
            summarize_run("b2n", "maple dtd", [seed(1, 80.0, 60.0), seed(2, 80.0, 60.0)])]
    hm_aircraft = 2 * 41.0 * 32.0 / 73.0
    hm_average = 2 * 60.5 * 46.0 / 106.5
    assert latex_table(runs).splitlines() == [
        r"\begin{tabular}{lrrrrr}",
        r"\toprule",
        r"Run & Dataset & Seeds & Base & Novel & HM \\",
        r"\midrule",
        rf"maple fgvc\_aircraft & fgvc\_aircraft & 2 & 41.00 $\pm$ 1.41 & 32.00 $\pm$ 2.83 & {hm_aircraft:.2f} \\",
        r"maple dtd & dtd & 2 & 80.00 $\pm$ 0.00 & 60.00 $\pm$ 0.00 & 68.57 \\",
        r"\midrule",
        rf"\textbf{{Average}} & 2 datasets &  & 60.50 & 46.00 & {hm_average:.2f} \\",
        r"\bottomrule",
        r"\end{tabular}",
    ]


def test_a_seed_far_from_its_runs_median_is_named_under_the_table():
    """CoOp's DTD: 12 % with one seed, 63 % with the others (KaiyangZhou/CoOp#24): named with its seed, value and
    the median, so a diverged run is not averaged away unnoticed; spreads of a few points are not named."""
    diverged = summarize_run("b2n", "coop dtd", [seed(1, 80.0, 63.0), seed(2, 79.0, 12.0), seed(3, 81.0, 61.0)])
    assert diverged["targets"]["dtd/novel"]["per_seed"] == [[1, 63.0], [2, 12.0], [3, 61.0]]
    steady = summarize_run("b2n", "maple dtd", [seed(1, 80.0, 60.0), seed(2, 78.0, 55.0), seed(3, 82.0, 64.0)])
    note = markdown_table([diverged, steady]).strip().splitlines()[-1]
    assert note.endswith("Seeds more than 10 points from their run's median (a diverged run or a bad split? see its"
                         " log): coop dtd: dtd/novel seed 2 (12.00; median 61.00).")
    assert "Seeds more than" not in markdown_table([steady])
    two = summarize_run("b2n", "coop eurosat", [seed(1, 90.0, 70.0), seed(2, 90.0, 20.0)])
    assert "Seeds more than" not in markdown_table([two])  # two seeds: no median to stand apart from
