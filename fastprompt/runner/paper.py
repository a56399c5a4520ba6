"""The papers' published accuracies, and a run's table set beside them (`fastprompt report RUNS --paper`).

Figures as printed in the sources (METHODS.md §6 of the design notes): ViT-B/16 with OpenAI's weights, the
papers' presets, mean of 3 seeds. Base-to-novel: MMRL Table 1 (its CLIP, CoOp, CoCoOp and MaPLe rows equal the
MaPLe repository's); the averages of VPT-deep, deep language prompting and IVLP from the MaPLe repository's model
zoo and MuDPT's from its Table III (no per-dataset figures). Cross-dataset: MMRL Table 2 (MuDPT: its Table II).
Domain generalisation: MMRL's domain-generalisation table (MuDPT: its Table IV). Few-shot: MMRL Tables 10-11
(K = 1, 2, 4, 8, 16).
A run is compared only when it ran that setting (backbone ViT-B-16, pretrained openai, the table's shots); other
runs are named in the note with what differs. A difference is a fact about two numbers, not a verdict: the papers
report 3 seeds, and the few-shot splits, the software versions and the machine move results by a point or more.
"""

from __future__ import annotations

import statistics

from .results import harmonic_mean, markdown_lines

PAPER_BACKBONE, PAPER_WEIGHTS = "ViT-B-16", "openai"
# Both names build OpenAI's ViT-B/16 with the 'openai' weights (QuickGELU: fastprompt.backbones.tag_model_options).
PAPER_BACKBONES = (PAPER_BACKBONE, "ViT-B-16-quickgelu")
FEW_SHOT_KS = (1, 2, 4, 8, 16)

# As printed, inconsistencies of the sources included (tests/runner/test_paper.py checks the rest): MMRL Table 1's
# DTD row for MMRL gives HM 73.82 where 2BN/(B+N) of its 85.67 / 65.00 is 73.92; MMRL Table 10's MaPLe 4-shot
# average is 75.37 where its eleven datasets average 75.75.
B2N = {  # MMRL Table 1: (base, novel, HM)
    "clip": {
        "average": (69.34, 74.22, 71.7),
        "imagenet": (72.43, 68.14, 70.22),
        "caltech101": (96.84, 94.0, 95.4),
        "oxford_pets": (91.17, 97.26, 94.12),
        "stanford_cars": (63.37, 74.89, 68.65),
        "oxford_flowers": (72.08, 77.8, 74.83),
        "food101": (90.1, 91.22, 90.66),
        "fgvc_aircraft": (27.19, 36.29, 31.09),
        "sun397": (69.36, 75.35, 72.23),
        "dtd": (53.24, 59.9, 56.37),
        "eurosat": (56.48, 64.05, 60.03),
        "ucf101": (70.53, 77.5, 73.85),
    },
    "coop": {
        "average": (82.69, 63.22, 71.66),
        "imagenet": (76.47, 67.88, 71.92),
        "caltech101": (98.0, 89.81, 93.73),
        "oxford_pets": (93.67, 95.29, 94.47),
        "stanford_cars": (78.12, 60.4, 68.13),
        "oxford_flowers": (97.6, 59.67, 74.06),
        "food101": (88.33, 82.26, 85.19),
        "fgvc_aircraft": (40.44, 22.3, 28.75),
        "sun397": (80.6, 65.89, 72.51),
        "dtd": (79.44, 41.18, 54.24),
        "eurosat": (92.19, 54.74, 68.69),
        "ucf101": (84.69, 56.05, 67.46),
    },
    "cocoop": {
        "average": (80.47, 71.69, 75.83),
        "imagenet": (75.98, 70.43, 73.1),
        "caltech101": (97.96, 93.81, 95.84),
        "oxford_pets": (95.2, 97.69, 96.43),
        "stanford_cars": (70.49, 73.59, 72.01),
        "oxford_flowers": (94.87, 71.75, 81.71),
        "food101": (90.7, 91.29, 90.99),
        "fgvc_aircraft": (33.41, 23.71, 27.74),
        "sun397": (79.74, 76.86, 78.27),
        "dtd": (77.01, 56.0, 64.85),
        "eurosat": (87.49, 60.04, 71.21),
        "ucf101": (82.33, 73.45, 77.64),
    },
    "maple": {
        "average": (82.28, 75.14, 78.55),
        "imagenet": (76.66, 70.54, 73.47),
        "caltech101": (97.74, 94.36, 96.02),
        "oxford_pets": (95.43, 97.76, 96.58),
        "stanford_cars": (72.94, 74.0, 73.47),
        "oxford_flowers": (95.92, 72.46, 82.56),
        "food101": (90.71, 92.05, 91.38),
        "fgvc_aircraft": (37.44, 35.61, 36.5),
        "sun397": (80.82, 78.7, 79.75),
        "dtd": (80.36, 59.18, 68.16),
        "eurosat": (94.07, 73.23, 82.35),
        "ucf101": (83.0, 78.66, 80.77),
    },
    "promptsrc": {
        "average": (84.26, 76.1, 79.97),
        "imagenet": (77.6, 70.73, 74.01),
        "caltech101": (98.1, 94.03, 96.02),
        "oxford_pets": (95.33, 97.3, 96.3),
        "stanford_cars": (78.27, 74.97, 76.58),
        "oxford_flowers": (98.07, 76.5, 85.95),
        "food101": (90.67, 91.53, 91.1),
        "fgvc_aircraft": (42.73, 37.87, 40.15),
        "sun397": (82.67, 78.47, 80.52),
        "dtd": (83.37, 62.97, 71.75),
        "eurosat": (92.9, 73.9, 82.32),
        "ucf101": (87.1, 78.8, 82.74),
    },
    "mmrl": {
        "average": (85.68, 77.16, 81.2),
        "imagenet": (77.9, 71.3, 74.45),
        "caltech101": (98.97, 94.5, 96.68),
        "oxford_pets": (95.9, 97.6, 96.74),
        "stanford_cars": (81.3, 75.07, 78.06),
        "oxford_flowers": (98.97, 77.27, 86.78),
        "food101": (90.57, 91.5, 91.03),
        "fgvc_aircraft": (46.3, 37.03, 41.15),
        "sun397": (83.2, 79.3, 81.2),
        "dtd": (85.67, 65.0, 73.82),
        "eurosat": (95.6, 80.17, 87.21),
        "ucf101": (88.1, 80.07, 83.89),
    },
}
XD = {  # MMRL Table 2 (MuDPT: its Table II): source ImageNet, the ten targets, their average
    "coop": {"imagenet": 71.51, "caltech101": 93.7, "oxford_pets": 89.14, "stanford_cars": 64.51, "oxford_flowers":
             68.71, "food101": 85.3, "fgvc_aircraft": 18.47, "sun397": 64.15, "dtd": 41.92, "eurosat": 46.39,
             "ucf101": 66.55, "average": 63.88},
    "cocoop": {"imagenet": 71.02, "caltech101": 94.43, "oxford_pets": 90.14, "stanford_cars": 65.32,
               "oxford_flowers": 71.88, "food101": 86.06, "fgvc_aircraft": 22.94, "sun397": 67.36, "dtd": 45.73,
               "eurosat": 45.37, "ucf101": 68.21, "average": 65.74},
    "maple": {"imagenet": 70.72, "caltech101": 93.53, "oxford_pets": 90.49, "stanford_cars": 65.57,
              "oxford_flowers": 72.23, "food101": 86.2, "fgvc_aircraft": 24.74, "sun397": 67.01, "dtd": 46.49,
              "eurosat": 48.06, "ucf101": 68.69, "average": 66.3},
    "promptsrc": {"imagenet": 71.27, "caltech101": 93.6, "oxford_pets": 90.25, "stanford_cars": 65.7,
                  "oxford_flowers": 70.25, "food101": 86.15, "fgvc_aircraft": 23.9, "sun397": 67.1, "dtd": 46.87,
                  "eurosat": 45.5, "ucf101": 68.75, "average": 65.81},
    "mmrl": {"imagenet": 72.03, "caltech101": 94.67, "oxford_pets": 91.43, "stanford_cars": 66.1, "oxford_flowers":
             72.77, "food101": 86.4, "fgvc_aircraft": 26.3, "sun397": 67.57, "dtd": 45.9, "eurosat": 53.1, "ucf101":
             68.27, "average": 67.25},
    "mudpt": {"imagenet": 72.13, "caltech101": 94.07, "oxford_pets": 90.74, "stanford_cars": 65.58,
              "oxford_flowers": 71.8, "food101": 86.13, "fgvc_aircraft": 24.12, "sun397": 67.38, "dtd": 45.3,
              "eurosat": 47.14, "ucf101": 69.0, "average": 66.13},
}
DG = {
    "clip": {"imagenet": 66.73, "imagenetv2": 60.83, "imagenet_sketch": 46.15, "imagenet_a": 47.77, "imagenet_r":
             73.96},
    "coop": {'imagenet': 71.51, 'imagenetv2': 64.2, 'imagenet_sketch': 47.99, 'imagenet_a': 49.71, 'imagenet_r': 75.21},
    "cocoop": {"imagenet": 71.02, "imagenetv2": 64.07, "imagenet_sketch": 48.75, "imagenet_a": 50.63, "imagenet_r":
               76.18},
    "maple": {"imagenet": 70.72, "imagenetv2": 64.07, "imagenet_sketch": 49.15, "imagenet_a": 50.9, "imagenet_r":
              76.98},
    "promptsrc": {"imagenet": 71.27, "imagenetv2": 64.35, "imagenet_sketch": 49.55, "imagenet_a": 50.9,
                  "imagenet_r": 77.8},
    "mmrl": {'imagenet': 72.03, 'imagenetv2': 64.47, 'imagenet_sketch': 49.17, 'imagenet_a': 51.2, 'imagenet_r': 77.53},
    "mudpt": {"imagenet": 72.13, "imagenetv2": 64.92, "imagenet_sketch": 49.31, "imagenet_a": 49.61, "imagenet_r":
              77.02},
}
FEWSHOT = {  # MMRL Tables 10-11: accuracy at K = 1, 2, 4, 8, 16
    "coop": {
        "average": (67.56, 70.65, 74.02, 76.98, 79.89),
        "imagenet": (66.33, 67.07, 68.73, 70.63, 71.87),
        "caltech101": (92.6, 93.07, 94.4, 94.37, 95.57),
        "oxford_pets": (90.37, 89.8, 92.57, 91.27, 91.87),
        "stanford_cars": (67.43, 70.5, 74.47, 79.3, 83.07),
        "oxford_flowers": (77.53, 87.33, 92.17, 94.97, 97.07),
        "food101": (84.33, 84.4, 84.47, 82.67, 84.2),
        "fgvc_aircraft": (21.37, 26.2, 30.83, 39.0, 43.4),
        "sun397": (66.77, 66.53, 69.97, 71.53, 74.67),
        "dtd": (50.23, 53.6, 58.7, 64.77, 69.87),
        "eurosat": (54.93, 65.17, 70.8, 78.07, 84.93),
        "ucf101": (71.23, 73.43, 77.1, 80.2, 82.23),
    },
    "cocoop": {
        "average": (66.79, 67.65, 71.21, 72.96, 74.9),
        "imagenet": (69.43, 69.78, 70.39, 70.63, 70.83),
        "caltech101": (93.83, 94.82, 94.98, 95.04, 95.16),
        "oxford_pets": (91.27, 92.64, 92.81, 93.45, 93.34),
        "stanford_cars": (67.22, 68.37, 69.39, 70.44, 71.57),
        "oxford_flowers": (72.08, 75.79, 78.4, 84.3, 87.84),
        "food101": (85.65, 86.22, 86.88, 86.97, 87.25),
        "fgvc_aircraft": (12.68, 15.06, 24.79, 26.61, 31.21),
        "sun397": (68.33, 69.03, 70.21, 70.84, 72.15),
        "dtd": (48.54, 52.17, 55.04, 58.89, 63.04),
        "eurosat": (55.33, 46.74, 65.56, 68.21, 73.32),
        "ucf101": (70.3, 73.51, 74.82, 77.14, 78.14),
    },
    "maple": {
        "average": (69.27, 72.58, 75.37, 78.89, 81.79),
        "imagenet": (62.67, 65.1, 67.7, 70.3, 72.33),
        "caltech101": (92.57, 93.97, 94.43, 95.2, 96.0),
        "oxford_pets": (89.1, 90.87, 91.9, 92.57, 92.83),
        "stanford_cars": (66.6, 71.6, 75.3, 79.47, 83.57),
        "oxford_flowers": (83.3, 88.93, 92.67, 95.8, 97.0),
        "food101": (80.5, 81.47, 81.77, 83.6, 85.33),
        "fgvc_aircraft": (26.73, 30.9, 34.87, 42.0, 48.4),
        "sun397": (64.77, 67.1, 70.67, 73.23, 75.53),
        "dtd": (52.13, 55.5, 61.0, 66.5, 71.33),
        "eurosat": (71.8, 78.3, 84.5, 87.73, 92.33),
        "ucf101": (71.83, 74.6, 78.47, 81.37, 85.03),
    },
    "promptsrc": {
        "average": (72.32, 75.29, 78.35, 80.69, 82.87),
        "imagenet": (68.13, 69.77, 71.07, 72.33, 73.17),
        "caltech101": (93.67, 94.53, 95.27, 95.67, 96.07),
        "oxford_pets": (92.0, 92.5, 93.43, 93.5, 93.67),
        "stanford_cars": (69.4, 73.4, 77.13, 80.97, 83.83),
        "oxford_flowers": (85.93, 91.17, 93.87, 96.27, 97.6),
        "food101": (84.87, 85.7, 86.17, 86.9, 87.5),
        "fgvc_aircraft": (27.67, 31.7, 37.47, 43.27, 50.83),
        "sun397": (69.67, 71.6, 74.0, 75.73, 77.23),
        "dtd": (56.23, 59.97, 65.53, 69.87, 72.73),
        "eurosat": (73.13, 79.37, 86.3, 88.8, 92.43),
        "ucf101": (74.8, 78.5, 81.57, 84.3, 86.47),
    },
    "mmrl": {
        "average": (72.67, 75.9, 79.2, 81.47, 84.34),
        "imagenet": (69.0, 70.3, 71.4, 72.33, 73.4),
        "caltech101": (94.17, 94.83, 96.03, 96.27, 97.13),
        "oxford_pets": (90.87, 91.57, 92.57, 93.03, 93.83),
        "stanford_cars": (68.7, 72.93, 78.17, 82.57, 86.43),
        "oxford_flowers": (85.97, 91.2, 94.6, 96.6, 98.4),
        "food101": (84.87, 85.53, 85.77, 86.33, 87.03),
        "fgvc_aircraft": (28.53, 34.23, 40.47, 48.07, 57.6),
        "sun397": (68.9, 71.53, 73.93, 76.0, 77.7),
        "dtd": (56.37, 61.37, 67.87, 71.6, 75.3),
        "eurosat": (76.0, 82.87, 87.67, 88.73, 93.37),
        "ucf101": (75.97, 78.5, 82.67, 84.67, 87.6),
    },
}

B2N_AVERAGES = {  # methods with an 11-dataset average only: (base, novel, HM)
    "vpt_deep": (80.24, 73.43, 76.68),  # MaPLe repository, model zoo
    "deep_language": (81.72, 73.81, 77.56),  # MaPLe repository, model zoo
    "ivlp": (82.15, 74.07, 77.90),  # MaPLe repository, model zoo
    "mudpt": (82.71, 74.5, 78.39),  # MuDPT Table III
}
SOURCES = {"b2n": "MMRL Table 1; averages of vpt_deep, deep_language, ivlp: MaPLe repository; mudpt: MuDPT Table III",
           "xd": "MMRL Table 2; mudpt: MuDPT Table II",
           "dg": "MMRL's domain-generalisation table; mudpt: MuDPT Table IV",
           "fewshot": "MMRL Tables 10-11"}


# --- the comparison -----------------------------------------------------------------------------------------------
def _cell(ours: float, paper: float | None) -> str:
    if paper is None:
        return f"{ours:.2f} (–)"
    return f"{ours:.2f} ({paper:.2f}, {ours - paper:+.2f})"


def _setting_problem(summary: dict, shots: int | None) -> str | None:
    """What keeps a run from being compared with the papers' figures (None: nothing)."""
    config = summary.get("config")
    if not config:
        return "its summary holds no config (written before configs were stored)"
    differs = []
    if config.get("backbone") not in PAPER_BACKBONES:
        differs.append(f"backbone {config.get('backbone')}")
    if config.get("pretrained") != PAPER_WEIGHTS:
        differs.append(f"weights {config.get('pretrained') or 'random'}")
    if shots is not None and config.get("shots") != shots:
        differs.append(f"{config.get('shots')} shots")
    return ", ".join(differs) or None


# The config keys that change what is trained; a run that changed one of its preset's is still compared, and the
# note names the change (the others: folders, devices, loaders, evaluation batch, kernels, seeds).
TRAINING_KEYS = ("optimizer", "lr", "weight_decay", "momentum", "epochs", "warmup_epochs", "warmup_lr", "batch_size",
                 "crop_scale", "gpa", "options", "dataset_options")


def preset_changes(config: dict) -> list[str]:
    """`key preset -> run` for each training key where the run's config differs from its paper preset."""
    from .config import ConfigError, resolve_config

    try:
        preset = resolve_config({}, {"method": config["method"], "protocol": config["protocol"],
                                     "dataset": config["dataset"], "shots": str(config["shots"])}).config.to_dict()
    except (ConfigError, KeyError, ValueError):
        return []  # a config this release cannot resolve (an older method option): nothing to compare it with
    from ..methods import method_options

    defaults = method_options(config["method"])  # an option neither sets is the method's default
    changes = []
    for key in TRAINING_KEYS:
        ours, theirs = config.get(key), preset.get(key)
        if key == "options":
            ours, theirs = {**defaults, **(ours or {})}, {**defaults, **theirs}
        if isinstance(theirs, dict):
            ours = ours or {}
            changes += [f"{name} {theirs.get(name)!r} -> {ours.get(name)!r}" for name in sorted(set(ours) | set(theirs))
                        if ours.get(name) != theirs.get(name)]
        elif ours != theirs and not (isinstance(theirs, list) and list(ours or ()) == theirs):
            changes.append(f"{key} {theirs!r} -> {ours!r}")
    return changes


def _b2n_rows(summaries, notes):
    rows, by_method = [], {}
    for s in summaries:
        method, b = s["config"]["method"], s["b2n"]
        paper = B2N.get(method, {}).get(b["dataset"])
        base, novel = b["base"][0], b["novel"][0]
        rows.append([s["name"], b["dataset"], _cell(base, paper and paper[0]), _cell(novel, paper and paper[1]),
                     _cell(b["hm"], paper and paper[2])])
        by_method.setdefault(method, {})[b["dataset"]] = (base, novel)
        if paper is None and method not in B2N:
            notes.add(f"no per-dataset figures of {method} on b2n")
    for method, found in by_method.items():
        paper = B2N.get(method, {}).get("average") or B2N_AVERAGES.get(method)
        if paper is None:
            continue
        missing = set(B2N["clip"]) - {"average"} - set(found)
        if missing:
            notes.add(f"no Average for {method}: the papers average all 11 datasets ({len(missing)} not run)")
            continue
        base = statistics.fmean(v[0] for v in found.values())
        novel = statistics.fmean(v[1] for v in found.values())
        rows.append([f"**Average {method}**", "11 datasets", _cell(base, paper[0]), _cell(novel, paper[1]),
                     _cell(harmonic_mean(base, novel), paper[2])])
    return ["Run", "Dataset", "Base (paper, Δ)", "Novel (paper, Δ)", "HM (paper, Δ)"], rows


def _fewshot_rows(summaries, notes):
    rows = []
    for s in summaries:
        method, shots = s["config"]["method"], s["config"]["shots"]
        ((key, target),) = s["targets"].items()
        figures = FEWSHOT.get(method, {}).get(target["dataset"])
        paper = figures[FEW_SHOT_KS.index(shots)] if figures is not None and shots in FEW_SHOT_KS else None
        if figures is None:
            notes.add(f"no figures of {method} on {target['dataset']} few-shot")
        rows.append([s["name"], target["dataset"], str(shots), _cell(target["accuracy"][0], paper)])
    return ["Run", "Dataset", "Shots", "Accuracy (paper, Δ)"], rows


def _transfer_rows(protocol, summaries, notes):
    table = XD if protocol == "xd" else DG
    rows = []
    for s in summaries:
        method = s["config"]["method"]
        figures = table.get(method)
        if figures is None:
            notes.add(f"no figures of {method} on {protocol}")
        keys = list(s["targets"])
        for index, key in enumerate(keys):
            target = s["targets"][key]
            paper = figures.get(target["dataset"]) if figures else None
            role = "source" if index == 0 else "target"
            rows.append([s["name"], f"{key} ({role})", _cell(target["accuracy"][0], paper)])
        targets = [s["targets"][k]["accuracy"][0] for k in keys[1:]]
        if protocol == "xd" and len(targets) == 10:  # the papers' average is over the ten targets
            paper = figures.get("average") if figures else None
            rows.append([f"**{s['name']}**", "Average (targets)", _cell(statistics.fmean(targets), paper)])
    return ["Run", "Dataset", "Accuracy (paper, Δ)"], rows


def paper_comparison(summaries: list[dict]) -> str:
    """A Markdown table of the runs that ran the papers' setting, each figure with the paper's and the difference
    (ours − paper), and a note naming the source and the runs or methods left out."""
    if not summaries:
        return ""
    protocol = summaries[0]["protocol"]
    notes: set[str] = set()
    comparable = []
    for s in summaries:
        problem = _setting_problem(s, 16 if protocol != "fewshot" else None)
        if problem is None and protocol == "fewshot" and s["config"].get("shots") not in FEW_SHOT_KS:
            problem = f"{s['config'].get('shots')} shots (the papers report K = 1, 2, 4, 8, 16)"
        if problem is not None:
            notes.add(f"not compared: {s['name']} ({problem}; the figures are for {PAPER_BACKBONE} with"
                      f" {PAPER_WEIGHTS} weights{', 16 shots' if protocol != 'fewshot' else ''})")
        else:
            comparable.append(s)
            if len(s["seeds"]) < 3:
                notes.add(f"the papers average 3 seeds; {s['name']} has {len(s['seeds'])}")
            changed = preset_changes(s["config"])
            if changed:
                notes.add(f"compared though it changed its paper preset: {s['name']} ({', '.join(changed)})")
    if comparable:
        if protocol == "b2n":
            header, rows = _b2n_rows(comparable, notes)
        elif protocol == "fewshot":
            header, rows = _fewshot_rows(comparable, notes)
        else:
            header, rows = _transfer_rows(protocol, comparable, notes)
        text = "\n".join(markdown_lines(header, rows)) + f"\n\nPaper figures: {SOURCES[protocol]}; Δ = this run − the paper."
    else:
        text = "No run here ran the papers' setting."
    if notes:
        text += " " + " ".join(sorted(note[0].upper() + note[1:] + "." for note in notes))
    return text + "\n"
