"""Aggregating seeds and datasets into the papers' tables (METHODS.md §2), as Markdown, CSV and LaTeX.

Conventions:
* Per target, accuracy and macro-F1 are averaged over seeds; the spread is the sample standard deviation
  (n - 1; 0 for a single seed).
* Base-to-novel: HM = 2BN / (B + N) of the seed-averaged base and novel accuracies (not the mean of per-seed
  HMs). A dataset-average row averages B and N over datasets and takes the HM of those averages.
* Cross-dataset / domain generalisation: one row per run (source and each target); "Average" is the mean
  over the targets, the source excluded, as in the papers' tables.
"""

from __future__ import annotations

import csv
import io
import math
import statistics


class ReportError(ValueError):
    """Summaries that cannot share one table (runs of different protocols); the message names the runs."""


def harmonic_mean(base: float, novel: float) -> float:
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate_seeds(seed_results: list[dict]) -> dict:
    """{target key: {accuracy: (mean, std), macro_f1: (mean, std), seeds: n, dataset, subset}} over seeds."""
    by_key: dict[str, dict] = {}
    for result in seed_results:
        for record in result["targets"]:
            key = record["dataset"] if record["subset"] == "all" else f"{record['dataset']}/{record['subset']}"
            entry = by_key.setdefault(key, {"dataset": record["dataset"], "subset": record["subset"],
                                            "accuracy": [], "macro_f1": [], "per_seed": []})
            entry["accuracy"].append(record["accuracy"])
            entry["macro_f1"].append(record["macro_f1"])
            entry["per_seed"].append([result.get("seed"), record["accuracy"]])
    return {
        key: {"dataset": e["dataset"], "subset": e["subset"], "seeds": len(e["accuracy"]),
              "accuracy": mean_std(e["accuracy"]), "macro_f1": mean_std(e["macro_f1"]),
              "per_seed": e["per_seed"]}
        for key, e in by_key.items()
    }


# A seed this far from the median of its run's seeds is named under the table: CoOp's DTD gave 12 % with one seed
# and 63 % with another (KaiyangZhou/CoOp#24), a diverged run or a bad split that a mean ± std hides in plain sight.
OUTLIER_POINTS = 10.0


def outlier_seeds(summaries: list[dict]) -> list[str]:
    """'<run> <target> seed S (acc; median M)' for each seed more than OUTLIER_POINTS from its run's median (runs of
    three or more seeds; summaries written before per-seed values were kept are skipped)."""
    found = []
    for summary in summaries:
        for key, target in summary["targets"].items():
            values = target.get("per_seed") or []
            if len(values) < 3:
                continue
            middle = statistics.median(accuracy for _, accuracy in values)
            found += [f"{summary['name']}: {key} seed {seed} ({accuracy:.2f}; median {middle:.2f})"
                      for seed, accuracy in values if abs(accuracy - middle) > OUTLIER_POINTS]
    return found


def summarize_run(protocol: str, name: str, seed_results: list[dict]) -> dict:
    """One run's summary: per-target means/stds and, for b2n, base/novel/HM."""
    targets = aggregate_seeds(seed_results)
    summary = {"protocol": protocol, "name": name, "seeds": [r["seed"] for r in seed_results], "targets": targets}
    if protocol == "b2n":
        base = next(v for v in targets.values() if v["subset"] == "base")
        novel = next(v for v in targets.values() if v["subset"] == "novel")
        summary["b2n"] = {"dataset": base["dataset"], "base": base["accuracy"], "novel": novel["accuracy"],
                          "hm": harmonic_mean(base["accuracy"][0], novel["accuracy"][0])}
    return summary


def _pm(pair, digits: int = 2) -> str:
    mean, std = pair
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# --- tables -------------------------------------------------------------------------------------------
def table_rows(summaries: list[dict]) -> tuple[list[str], list[list], list[list[str]]]:
    """(header, numeric rows for CSV, formatted rows for Markdown) for summaries of one protocol."""
    if not summaries:
        raise ReportError("no runs to put in a table")
    by_protocol: dict[str, list[str]] = {}
    for s in summaries:
        by_protocol.setdefault(s["protocol"], []).append(s["name"])
    if len(by_protocol) != 1:
        # Each protocol has its own columns (base/novel/HM, accuracy, transfer targets): one table cannot hold two.
        listed = "; ".join(f"{protocol}: {', '.join(names)}" for protocol, names in sorted(by_protocol.items()))
        raise ReportError(f"cannot put runs of different protocols in one table ({listed}); report each protocol"
                          " separately")
    (protocol,) = by_protocol
    if protocol == "b2n":
        return _b2n_rows(summaries)
    if protocol == "fewshot":
        return _fewshot_rows(summaries)
    return _transfer_rows(summaries)


def _method_of(summary: dict) -> str:
    """The run's method: from its stored config (summaries before it was stored: the first word of the name)."""
    return summary.get("config", {}).get("method") or summary["name"].split()[0]


def _dataset_of(summary: dict) -> str:
    if "b2n" in summary:
        return summary["b2n"]["dataset"]
    return next(iter(summary["targets"].values()))["dataset"]


def _average_groups(summaries: list[dict]) -> tuple[list[tuple[str, list[dict], bool]], list[str]]:
    """Runs grouped by method, in order of first appearance: [(method, runs, averaged?)], and one line per group
    left without an Average row because a dataset is in more than one of its runs (an average over datasets would
    count that dataset twice). An average over several methods means nothing, so each method gets its own."""
    groups: dict[str, list[dict]] = {}
    # Few-shot runs of several shot counts (a sweep's --shots 1,2,4,8,16): one group per method and shot count.
    shots = {summary.get("config", {}).get("shots") for summary in summaries}
    by_shots = summaries[0]["protocol"] == "fewshot" and len(shots) > 1 and None not in shots
    for summary in summaries:
        key = _method_of(summary) + (f" {summary['config']['shots']}-shot" if by_shots else "")
        groups.setdefault(key, []).append(summary)
    result, unaveraged = [], []
    for method, group in groups.items():
        datasets = [_dataset_of(s) for s in group]
        repeated = sorted({d for d in datasets if datasets.count(d) > 1})
        if repeated:
            unaveraged.append(f"{method}: {', '.join(repeated)} in more than one run")
        result.append((method, group, len(group) > 1 and not repeated))
    return result, unaveraged


def _grouped_rows(summaries, row_of, average_of):
    """Each run's (numeric, formatted) row, grouped by method; a group of runs on two or more distinct datasets is
    followed by its Average row ("Average" alone when all runs are of one method)."""
    numeric, pretty = [], []
    groups, _ = _average_groups(summaries)
    for method, group, averaged in groups:
        for summary in group:
            row, shown = row_of(summary)
            numeric.append(row)
            pretty.append(shown)
        if averaged:
            label = "Average" if len(groups) == 1 else f"Average {method}"
            row, shown = average_of(group, label)
            numeric.append(row)
            pretty.append(shown)
    return numeric, pretty


def _b2n_rows(summaries):
    header = ["Run", "Dataset", "Seeds", "Base", "Base std", "Novel", "Novel std", "HM"]

    def row_of(s):
        b = s["b2n"]
        return ([s["name"], b["dataset"], len(s["seeds"]), *b["base"], *b["novel"], b["hm"]],
                [s["name"], b["dataset"], str(len(s["seeds"])), _pm(b["base"]), _pm(b["novel"]), f"{b['hm']:.2f}"])

    def average_of(group, label):
        base = statistics.fmean(s["b2n"]["base"][0] for s in group)
        novel = statistics.fmean(s["b2n"]["novel"][0] for s in group)
        hm = harmonic_mean(base, novel)
        return ([label, f"{len(group)} datasets", "", base, "", novel, "", hm],
                [f"**{label}**", f"{len(group)} datasets", "", f"{base:.2f}", f"{novel:.2f}", f"{hm:.2f}"])

    return (header, *_grouped_rows(summaries, row_of, average_of))


def _fewshot_rows(summaries):
    header = ["Run", "Dataset", "Seeds", "Accuracy", "Accuracy std", "Macro-F1", "Macro-F1 std"]

    def row_of(s):
        (target,) = s["targets"].values()
        return ([s["name"], target["dataset"], len(s["seeds"]), *target["accuracy"], *target["macro_f1"]],
                [s["name"], target["dataset"], str(len(s["seeds"])), _pm(target["accuracy"]), _pm(target["macro_f1"])])

    def average_of(group, label):
        acc = statistics.fmean(next(iter(s["targets"].values()))["accuracy"][0] for s in group)
        f1 = statistics.fmean(next(iter(s["targets"].values()))["macro_f1"][0] for s in group)
        return ([label, f"{len(group)} datasets", "", acc, "", f1, ""],
                [f"**{label}**", f"{len(group)} datasets", "", f"{acc:.2f}", f"{f1:.2f}"])

    return (header, *_grouped_rows(summaries, row_of, average_of))


def _transfer_rows(summaries):
    columns: list[str] = []
    for s in summaries:
        for key in s["targets"]:
            if key not in columns:
                columns.append(key)
    header = ["Run", "Seeds"]
    for key in columns:
        header += [key, f"{key} std"]
    header.append("Average (targets)")
    numeric, pretty = [], []
    for s in summaries:
        keys = list(s["targets"])
        target_keys = keys[1:]  # the first entry is the source dataset
        row, shown = [s["name"], len(s["seeds"])], [s["name"], str(len(s["seeds"]))]
        for key in columns:
            pair = s["targets"].get(key, {}).get("accuracy", (float("nan"), float("nan")))
            row += list(pair)
            shown.append(_pm(pair))
        average = statistics.fmean(s["targets"][k]["accuracy"][0] for k in target_keys) if target_keys else float("nan")
        row.append(average)
        shown.append("–" if math.isnan(average) else f"{average:.2f}")
        numeric.append(row)
        pretty.append(shown)
    pretty_header = ["Run", "Seeds", *columns, "Average (targets)"]
    return header, numeric, [pretty_header, *pretty]


def _shown_rows(summaries: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The header and formatted rows a printed table shows (mean ± std in one cell)."""
    header, _, pretty = table_rows(summaries)
    if summaries[0]["protocol"] in ("xd", "dg"):
        return pretty[0], pretty[1:]
    return [h for h in header if not h.endswith(" std")], pretty


def markdown_lines(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table's lines: the header, its rule, one line per row."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def markdown_table(summaries: list[dict]) -> str:
    header, pretty = _shown_rows(summaries)
    lines = markdown_lines(header, pretty)
    protocol = summaries[0]["protocol"]
    note = {
        "b2n": "Accuracy (%) mean ± sample std over seeds; HM of the seed-averaged base and novel.",
        "fewshot": "Accuracy and macro-F1 (%) mean ± sample std over seeds.",
    }.get(protocol, "Accuracy (%) mean ± sample std over seeds; Average over the targets (source excluded).")
    if protocol in ("b2n", "fewshot"):
        groups, unaveraged = _average_groups(summaries)
        if any(averaged for _, _, averaged in groups):
            note += (" An Average row averages base and novel over a method's datasets and takes the HM of those"
                     " averages." if protocol == "b2n" else " An Average row averages a method's datasets.")
        if unaveraged:
            note += f" No Average row for {'; '.join(unaveraged)}."
    outliers = outlier_seeds(summaries)
    if outliers:
        note += (f" Seeds more than {OUTLIER_POINTS:.0f} points from their run's median (a diverged run or a bad"
                 f" split? see its log): {'; '.join(outliers)}.")
    return "\n".join(lines) + f"\n\n{note}\n"


def csv_table(summaries: list[dict]) -> str:
    header, numeric, _ = table_rows(summaries)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in numeric:
        writer.writerow([f"{v:.4f}" if isinstance(v, float) else v for v in row])
    return buffer.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_cell(text: str) -> str:
    text = "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))
    bold = text.startswith("**") and text.endswith("**")
    text = text.strip("*") if bold else text
    text = text.replace(" ± ", r" $\pm$ ").replace("–", "--")
    return rf"\textbf{{{text}}}" if bold else text


def latex_table(summaries: list[dict]) -> str:
    """The Markdown table's cells as a LaTeX tabular (booktabs rules), for a paper's source: special characters
    escaped, ± as $\\pm$, the Average rows bold and set off by a rule."""
    header, pretty = _shown_rows(summaries)
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(_latex_cell(h) for h in header) + r" \\", r"\midrule"]
    for row in pretty:
        if str(row[0]).startswith("**"):
            lines.append(r"\midrule")
        lines.append(" & ".join(_latex_cell(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
