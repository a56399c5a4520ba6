"""fastprompt.runner: train and evaluate every method like the papers, from Python or the `fastprompt` CLI.

    from fastprompt.runner import resolve_config, train_run, predict
    resolved = resolve_config(overrides={"method": "maple", "protocol": "b2n", "dataset": "eurosat",
                                         "root": "/data", "seeds": "1,2,3"})
    summary = train_run(resolved)                     # writes runs/maple-b2n-eurosat-16shot/
    probs = predict(images, ["cat", "dog"], "runs/maple-b2n-eurosat-16shot/seed1")
    export_classifier("runs/coop-b2n-dtd-16shot/seed1", "dtd.safetensors")   # CoOp as one matrix for plain CLIP

Modules: config (typed config, overrides, files), presets (papers' hyper-parameters), data (protocol
splits, loaders, split hashes), device_data (few-shot set on the device), engine (one seed: loop,
precision, resume), checkpoint (safetensors + JSON, atomic writes), results (aggregation, tables),
run (run folders, eval of checkpoints), predict (class probabilities from a checkpoint), sweep (methods x
datasets x shots x seeds as parallel runs), paper (the papers' published figures), export (text-prompt methods
as a fixed classifier).
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, ResolvedConfig, RunConfig, format_config, resolve_config
from .export import ExportError, export_classifier
from .predict import Predictor, predict
from .paper import paper_comparison
from .presets import preset
from .results import csv_table, harmonic_mean, latex_table, markdown_table
from .run import RunError, evaluate_checkpoints, train_run

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ExportError",
    "Predictor",
    "ResolvedConfig",
    "RunConfig",
    "RunError",
    "csv_table",
    "evaluate_checkpoints",
    "export_classifier",
    "format_config",
    "harmonic_mean",
    "latex_table",
    "load_checkpoint",
    "markdown_table",
    "paper_comparison",
    "predict",
    "preset",
    "resolve_config",
    "save_checkpoint",
    "train_run",
]
