"""Render a benchmark results file as a Markdown table and a PNG plot.

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


def markdown(document: dict) -> str:
    device, versions, git = document["device"], document["versions"], document["git"]
    settings = document["settings"]
    lines = [
        f"# fastprompt training-step benchmark: {device['name']} ({device['type']})",
        "",
        f"{document.get('created', '')}; torch {versions.get('torch')}, triton {versions.get('triton')}, "
        f"open_clip {versions.get('open_clip')}, CUDA {versions.get('cuda')}, Python {versions.get('python')}; "
        f"commit {(git.get('commit') or 'unknown')[:12]}{' (dirty)' if git.get('dirty') else ''}.",
        f"Autocast {settings.get('amp_dtype') or 'off (fp32)'}; {settings.get('rounds')} timed steps after "
        f"{settings.get('warmup')} warm-up; {settings.get('optimizer', '')}. Median step time; peak = "
        "torch.cuda.max_memory_allocated. Floor = FLOPs of the contender's own computation at "
        f"{_num((document.get('peak') or {}).get('flops'), '.0f', 1e12)} TFLOP/s; exact floor = FLOPs of the packed "
        "computation (fastprompt's tokens).",
        "Contenders: eager = unpatched open_clip, 77-token text per class, fp32 weights under autocast; compiled = "
        "torch.compile of that step; fastprompt = patched CLIP, packed text, CUDA graph where possible.",
        "",
        "| workload | method | contender | step ms | img/s | speed vs eager | peak GiB | memory vs eager | "
        "predicted GiB | TFLOP/s | floor share | exact floor share | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in document["results"]:
        notes = r.get("reason") or ""
        if r.get("status") == "ran" and r.get("train_step_mode"):
            notes = "; ".join(x for x in (r["train_step_mode"], notes) if x)
        lines.append(
            f"| {r['workload']} | {r['method']} | {r['contender']} | {_num(r.get('step_ms_median'), '.1f')} | "
            f"{_num(r.get('images_per_s'), '.1f')} | {_ratio(r.get('speedup_vs_eager'))} | "
            f"{_num(r.get('peak_allocated_bytes'), '.2f', GiB)} | {_ratio(r.get('memory_vs_eager'))} | "
            f"{_num(r.get('predicted_peak_bytes'), '.2f', GiB)} | {_num(r.get('achieved_tflops'), '.1f')} | "
            f"{_num(r.get('floor_share'), '.0%')} | {_num(r.get('floor_share_exact'), '.0%')} | "
            f"{r['status'] if r.get('status') != 'ran' else ''}{': ' if r.get('status') != 'ran' else ''}"
            f"{notes.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in document["results"] if r.get("status") == "ran"]
    workloads = list(dict.fromkeys(r["workload"] for r in document["results"]))
    contenders = list(dict.fromkeys(r["contender"] for r in document["results"]))
    fig, axes = plt.subplots(2, len(workloads), figsize=(4.5 * len(workloads), 7), squeeze=False)
    for col, workload in enumerate(workloads):
        rows = [r for r in results if r["workload"] == workload]
        methods = list(dict.fromkeys(r["method"] for r in document["results"] if r["workload"] == workload))
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
    fig.suptitle(f"fastprompt training step, {document['device']['name']}")
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
