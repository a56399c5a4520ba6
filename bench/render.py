"""Render a benchmark results file as Markdown tables (one per kind) and a PNG plot (the training steps).

    python bench/render.py bench/results/nvidia-h200-2026-01-31.json            # writes .md and .png beside it
    python bench/render.py RESULTS.json --out docs/bench --markdown-only         # docs/bench.md only

The plot needs matplotlib (the `bench` extra: pip install 'fastprompt[bench]'); without it the script stops with
that message before writing anything, unless --markdown-only. Standalone on purpose: json + matplotlib only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GiB = 2**30
NEEDED = ("device", "versions", "git", "settings", "results")
MATPLOTLIB_MISSING = ("bench/render.py: the PNG plot needs matplotlib, which is not installed; install it with"
                      " pip install 'fastprompt[bench]' (or pip install matplotlib), or pass --markdown-only")


def _num(value, fmt: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value / scale, fmt)


def _ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


# MMRL (Guo & Gu, CVPR 2025), Table 6: MaPLe's inference throughput at batch 100 on an RTX 4090. Shown beside the
# inference table as the paper's figure on another GPU, not a measurement of this suite.
PAPER_INFERENCE = ("maple", 100, 1758.0, "MMRL paper, Table 6: MaPLe at batch 100 on an RTX 4090 (the paper's figure,"
                   " another GPU, not measured here)")
KIND_TITLES = {"train_step": "Training step", "runner_epoch": "Runner epoch", "inference": "Inference"}


def _notes(r: dict) -> str:
    notes = r.get("reason") or ""
    if r.get("status") == "ran" and r.get("train_step_mode"):
        notes = "; ".join(x for x in (r["train_step_mode"], notes) if x)
    if r.get("status") != "ran":
        notes = f"{r.get('status')}: {notes}"
    return notes.replace("|", "/")


def _rows(records: list[dict], columns) -> list[str]:
    head = "| workload | method | contender | " + " | ".join(name for name, _ in columns) + " | notes |"
    rule = "|---|---|---|" + "---:|" * len(columns) + "---|"
    lines = [head, rule]
    for r in records:
        cells = " | ".join(cell(r) for _, cell in columns)
        lines.append(f"| {r['workload']} | {r['method']} | {r['contender']} | {cells} | {_notes(r)} |")
    return lines


SPEED = [("speed vs eager", lambda r: _ratio(r.get("speedup_vs_eager"))),
         ("speed vs tuned", lambda r: _ratio(r.get("speedup_vs_tuned")))]
PEAK = ("peak GiB", lambda r: _num(r.get("peak_allocated_bytes"), ".2f", GiB))
COLUMNS = {
    "train_step": [
        ("step ms", lambda r: _num(r.get("step_ms_median"), ".1f")),
        ("img/s", lambda r: _num(r.get("images_per_s"), ".1f")), *SPEED, PEAK,
        ("memory vs eager", lambda r: _ratio(r.get("memory_vs_eager"))),
        ("predicted GiB", lambda r: _num(r.get("predicted_peak_bytes"), ".2f", GiB)),
        ("TFLOP/s", lambda r: _num(r.get("achieved_tflops"), ".1f")),
        ("floor share", lambda r: _num(r.get("floor_share"), ".0%")),
        ("exact floor share", lambda r: _num(r.get("floor_share_exact"), ".0%")),
    ],
    "runner_epoch": [
        ("epoch s", lambda r: _num(r.get("epoch_s"), ".2f")),
        ("steps", lambda r: _num(r.get("epoch_steps"), ".0f")),
        ("img/s", lambda r: _num(r.get("images_per_s"), ".1f")),
        ("vs train step", lambda r: _num(r.get("epoch_vs_train_step"), ".0%")), *SPEED,
        ("loader s", lambda r: _num(r.get("loader_s"), ".2f")),
        ("data GiB", lambda r: _num(r.get("dataset_bytes"), ".2f", GiB)), PEAK,
    ],
    "inference": [
        ("batch", lambda r: _num(r.get("batch"), ".0f")),
        ("batch ms", lambda r: _num(r.get("step_ms_median"), ".1f")),
        ("img/s", lambda r: _num(r.get("images_per_s"), ".1f")), *SPEED, PEAK,
        ("TFLOP/s", lambda r: _num(r.get("achieved_tflops"), ".1f")),
        ("floor share", lambda r: _num(r.get("floor_share"), ".0%")),
    ],
}
EXPLAIN = {
    "train_step": "Median step (forward, loss, backward, SGD) on one batch held on the device; peak = "
                  "torch.cuda.max_memory_allocated over warm-up and timed steps. Floor = FLOPs of the contender's own "
                  "computation at the peak rate; exact floor = FLOPs of the packed computation (fastprompt's tokens).",
    "runner_epoch": "One whole epoch of the runner's loop (fastprompt.training.train_epoch) over a synthetic 16-shot "
                    "set of the workload's classes held on the device, augmented there; after a few warm-up steps. "
                    "vs train step = epoch images/s over the same case's train-step images/s; loader s = time spent "
                    "producing batches (the on-device augmentation) inside the epoch.",
    "inference": "model(images) in eval mode under no_grad (autocast on a GPU), median batch time; peak over "
                 "warm-up and timed batches. Floor = FLOPs of what depends on the images (the text of a class set is "
                 "cached) at the peak rate.",
}


def markdown(document: dict) -> str:
    device, versions, git = document["device"], document["versions"], document["git"]
    settings = document["settings"]
    lines = [
        f"# fastprompt benchmark: {device['name']} ({device['type']})",
        "",
        f"{document.get('created', '')}; torch {versions.get('torch')}, triton {versions.get('triton')}, "
        f"open_clip {versions.get('open_clip')}, CUDA {versions.get('cuda')}, Python {versions.get('python')}; "
        f"commit {(git.get('commit') or 'unknown')[:12]}{' (dirty)' if git.get('dirty') else ''}.",
        f"Autocast {settings.get('amp_dtype') or 'off (fp32)'}; {settings.get('rounds')} timed calls after "
        f"{settings.get('warmup')} warm-up; {settings.get('optimizer', '')}; FLOP peak "
        f"{_num((document.get('peak') or {}).get('flops'), '.0f', 1e12)} TFLOP/s.",
        "Contenders: eager = unpatched open_clip, 77-token text per class, fp32 weights under autocast (the research "
        "repos' computation); compiled = torch.compile of that step; tuned = the best stock-PyTorch step (unpatched "
        "open_clip with SDPA attention, bf16 weights, text cut after the longest EOT, torch.compile); fastprompt = "
        "patched CLIP, packed text, CUDA graph where possible. Speed vs tuned is the honest margin.",
    ]
    records = [dict(r, kind=r.get("kind", "train_step")) for r in document["results"]]  # schema 1: train steps
    for kind, title in KIND_TITLES.items():
        rows = [r for r in records if r["kind"] == kind]
        if not rows:
            continue
        lines += ["", f"## {title}", "", EXPLAIN[kind], "", *_rows(rows, COLUMNS[kind])]
        if kind == "inference":  # the paper's figure as a row of its own, labelled as such
            method, batch, rate, source = PAPER_INFERENCE
            paper = dict(workload="reference", method=method, contender="MMRL Table 6", batch=batch,
                         images_per_s=rate, status="ran", reason=source)
            lines += _rows([paper], COLUMNS[kind])[2:]
    return "\n".join(lines) + "\n"


def plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [dict(r, kind=r.get("kind", "train_step")) for r in document["results"]]
    kind = "train_step" if any(r["kind"] == "train_step" for r in records) else records[0]["kind"]
    records = [r for r in records if r["kind"] == kind]
    results = [r for r in records if r.get("status") == "ran"]
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    contenders = list(dict.fromkeys(r["contender"] for r in records))
    fig, axes = plt.subplots(2, len(workloads), figsize=(4.5 * len(workloads), 7), squeeze=False)
    for col, workload in enumerate(workloads):
        rows = [r for r in results if r["workload"] == workload]
        methods = list(dict.fromkeys(r["method"] for r in records if r["workload"] == workload))
        width = 0.8 / max(len(contenders), 1)
        measured = any(r.get("peak_allocated_bytes") for r in rows)
        memory = ("peak_allocated_bytes", GiB, "peak GiB") if measured else (
            "predicted_peak_bytes", GiB, "predicted peak GiB (not measured)")
        for row, (field, scale, label) in enumerate((("images_per_s", 1, "images/s"), memory)):
            ax = axes[row][col]
            for i, contender in enumerate(contenders):
                values = {r["method"]: r.get(field) for r in rows if r["contender"] == contender}
                xs = [m + i * width for m in range(len(methods))]
                ys = [(values.get(m) or 0) / scale for m in methods]
                ax.bar(xs, ys, width, label=contender)
            ax.set_xticks([m + width * (len(contenders) - 1) / 2 for m in range(len(methods))])
            ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(workload)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"fastprompt {KIND_TITLES[kind].lower()}, {document['device']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a bench/results/<device>-<date>.json file")
    parser.add_argument("--out", type=Path, help="output path without suffix (default: beside the JSON)")
    parser.add_argument("--markdown-only", action="store_true", help="write the table only (no matplotlib needed)")
    args = parser.parse_args(argv)
    if not args.markdown_only:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit(MATPLOTLIB_MISSING)
    try:
        document = json.loads(args.results.read_text())
    except (OSError, json.JSONDecodeError) as error:
        sys.exit(f"bench/render.py: cannot read {args.results}: {error}")
    missing = [k for k in NEEDED if k not in document]
    if missing or not document["results"]:
        sys.exit(f"bench/render.py: {args.results} is not a benchmark results file (missing {missing or 'results'})")
    out = args.out or args.results.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_name(out.name + ".md")
    md.write_text(markdown(document))
    print(md)
    if not args.markdown_only:
        png = out.with_name(out.name + ".png")
        plot(document, png)
        print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
