"""The `fastprompt` command line. Each subcommand lives in its own small function.

    fastprompt train --method maple --protocol b2n --dataset eurosat --root /data seeds=1,2,3 [--dry-run]
    fastprompt train ... --resume latest          continue the run in the same output folder
    fastprompt sweep --method maple --root /data          every dataset x seed, several runs at a time
    fastprompt eval runs/maple-b2n-eurosat-16shot           re-evaluate its checkpoints (never trains; or --run DIR)
    fastprompt report runs/*-b2n-* --markdown table.md --csv table.csv --latex table.tex
    fastprompt predict runs/maple-b2n-eurosat-16shot/seed1 photos/ --top 3     the top classes of image files
    fastprompt export runs/coop-b2n-dtd-16shot/seed1 --output dtd.safetensors  CoOp as one matrix for plain CLIP
    fastprompt export runs/maple-b2n-dtd-16shot/seed1 --output dtd.pt2          any method as a torch.export program
    fastprompt prepare eurosat --root /data [--download]
    fastprompt bench | demo | info

Config keys are given as key=value (see `fastprompt train --dry-run`); errors on bad input print one line
naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from .notes import warnings_as_notes

# The parser is built from these literal names, not from fastprompt.METHODS / fastprompt.data: importing
# those imports torch and open_clip (seconds), and `--help` and argument errors must answer at once.
# tests/test_cli_startup.py checks that they equal the registries.
METHOD_NAMES = ("clip", "coop", "cocoop", "vpt_deep", "deep_language", "ivlp", "maple", "mpl", "mudpt", "mmrl",
                "promptsrc", "mcpl")
DATASET_NAMES = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_sketch",
                 "imagenet_a", "imagenet_r", "procedural", "imagefolder", "csv")


def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(
        method=args.method,
        backbone=args.backbone,
        pretrained=args.pretrained,
        epochs=args.epochs,
        shots=args.shots,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        kernels=args.kernels,
    )
    if result["accuracy"] <= result["chance"]:
        print("warning: the run did not beat chance", file=sys.stderr)
        return 1
    return 0


def _info(args) -> int:
    from .info import main as info_main

    info_main()
    return 0


def _prepare(args) -> int:
    from .data import check_layout, download_dataset

    if args.download:
        archives = download_dataset(args.dataset, args.root)
        print(f"downloaded and unpacked {len(archives)} archive(s) into {os.path.abspath(args.root)}")
    report = check_layout(args.dataset, args.root, verify_images=args.verify)
    print(report.format())
    return 0 if report.ok else 1


# --- train ---------------------------------------------------------------------------------------------
_TRAIN_FLAGS = ("method", "protocol", "dataset", "root", "shots", "seeds", "output_dir")


def _overrides(args, extra: list[str], command: str) -> dict:
    from .runner.config import FIELDS, ConfigError, parse_overrides

    stray = [item for item in extra if "=" not in item or item.startswith("-")]
    if stray:
        # `--precision bf16` for precision=bf16 is the likely slip: a config key given as an option is named so.
        keys = [item for item in stray if item.startswith("--") and item[2:].partition("=")[0].replace("-", "_")
                in FIELDS]
        if keys:
            option, _, value = keys[0][2:].partition("=")
            key = option.replace("-", "_")
            raise ConfigError(f"unrecognised argument(s) {' '.join(stray)}; {key} is a config value: write it "
                              f"{key}={value or 'VALUE'} (config values are written key=value)")
        hint = _unknown_options_hint(build_parser(), command, stray)
        raise ConfigError(f"unrecognised argument(s) {' '.join(stray)}{hint}; config values are written key=value")
    overrides = parse_overrides(list(getattr(args, "overrides", []) or []) + extra)
    for flag in _TRAIN_FLAGS:
        value = getattr(args, flag, None)
        if value is None:
            continue
        option = "--" + flag.replace("_", "-")
        if flag in overrides and str(overrides[flag]) != str(value):
            raise ConfigError(f"conflicting values for {flag}: {option} {value} and {flag}={overrides[flag]}")
        overrides[flag] = str(value)
    return overrides


def _names_only_the_folder(overrides: dict, file_values: dict) -> bool:
    """True when a resume names its output folder and nothing else that a run's config holds."""
    from .runner.run import RESUMABLE_CHANGES

    return not file_values and "output_dir" in overrides and set(overrides) <= set(RESUMABLE_CHANGES)


def _train(args, extra) -> int:
    from .runner.config import ConfigError, format_config, load_config_file, resolve_config
    from .runner.run import config_for_resume, resume_folder, train_run

    overrides = _overrides(args, extra, "train")
    file_values = load_config_file(args.config) if args.config else {}
    if args.dry_run and args.resume:
        raise ConfigError("--dry-run and --resume conflict: a dry run prints a new run's config and trains nothing")
    if args.resume is None:
        resolved = resolve_config(file_values, overrides)
        if args.dry_run:
            print(format_config(resolved))
            return 0
        _check_output_path(resolved.config.resolved_output_dir(), "output folder", folder=True)
        train_run(resolved)
        return 0
    if args.resume == "latest" and _names_only_the_folder(overrides, file_values):
        # `--resume latest output_dir=DIR`: the run in DIR with the config it started with, as `--resume DIR`
        # (resolving the defaults here would compare the run with a config nobody asked for).
        run_dir = os.path.abspath(os.path.expanduser(overrides["output_dir"]))
        if not os.path.isdir(run_dir):
            raise ConfigError(f"--resume latest: there is no run to resume at {run_dir}")
        config = config_for_resume(resume_folder(run_dir), overrides)
    elif args.resume == "latest":
        resolved = resolve_config(file_values, overrides)
        run_dir = resolved.config.resolved_output_dir()
        if not os.path.isdir(run_dir):
            raise ConfigError(f"--resume latest: there is no run to resume at {run_dir}")
        try:
            config = config_for_resume(resume_folder(run_dir), None, candidate=resolved.config)
        except ConfigError as error:
            raise ConfigError(f"{error} To continue it as it started: fastprompt train --resume {run_dir}") from None
    else:
        if file_values:
            raise ConfigError("--config and --resume PATH conflict: the resumed run's config is stored in its folder")
        run_dir = resume_folder(args.resume)
        given = overrides.get("output_dir")
        if given is not None and os.path.abspath(os.path.expanduser(given)) != run_dir:
            raise ConfigError(f"conflicting output folders: --resume {args.resume} is in {run_dir}, output_dir={given}")
        config = config_for_resume(run_dir, overrides)
    train_run(config=config, resume_dir=config.resolved_output_dir())
    return 0


# --- sweep ---------------------------------------------------------------------------------------------
def _sweep(args, extra) -> int:
    from .parallel import data_parallel
    from .runner.config import ConfigError, load_config_file
    from .runner.sweep import device_names, device_slots, job_state, plan_sweep, run_sweep

    if data_parallel.world_size() > 1 or "LOCAL_RANK" in os.environ:
        raise ConfigError("a sweep starts its own processes, one per run: run it without torchrun")
    overrides = _overrides(argparse.Namespace(overrides=args.overrides), extra, "sweep")
    file_values = load_config_file(args.config) if args.config else {}
    sweep = plan_sweep(args.method, args.protocol, args.datasets, args.shots, args.seeds, args.root, file_values,
                       overrides, args.output)
    slots = device_slots(args.devices, args.jobs_per_device)
    if args.dry_run:
        jobs = sweep.jobs()
        print(f"# {len(jobs)} runs in {sweep.output_dir}, {len(slots)} at a time on {device_names(slots)}; each is")
        print("# fastprompt train " + " ".join(sweep.train_arguments(jobs[0])))
        for job in jobs:
            print(f"{job.name}: {job_state(job)}")
        return 0
    if args.output is None:
        print(f"sweep folder: {sweep.output_dir}")
    _check_output_path(sweep.output_dir, "--output", folder=True)
    outcome = run_sweep(sweep, slots)
    return 1 if outcome["failed"] else 0


# --- eval ----------------------------------------------------------------------------------------------
def _eval(args, extra) -> int:
    from .runner.checkpoint import atomic_write_json, read_json
    from .runner.config import ConfigError
    from .runner.results import markdown_table, summarize_run
    from .parallel import data_parallel
    from .runner.run import (checkpoints_of_run, evaluate_checkpoints, finished_checkpoints, join_torchrun, run_name,
                             stored_config)

    values, extra = _eval_run_folder(args, extra)
    if bool(args.run) == bool(args.checkpoint):
        raise ConfigError("give exactly one of --run DIR (or DIR alone) or --checkpoint PATH")
    if args.dataset is None and (args.subset != "all" or args.mode is not None):
        raise ConfigError("--subset and --mode apply to --dataset; without it the run's own targets are evaluated")
    overrides = _overrides(argparse.Namespace(overrides=values, root=args.root), extra, "eval")
    if args.output:
        _check_output_path(args.output, "--output", folder=False)
    join_torchrun(str(overrides.get("device", "auto")))  # under torchrun every rank evaluates its shard
    # A run folder given as --checkpoint: each of its seeds' checkpoints (on --dataset, or on its own targets).
    folders = checkpoints_of_run(args.run) if args.run else [found for path in args.checkpoint
                                                            for found in finished_checkpoints(path)]
    outputs = evaluate_checkpoints(folders, overrides, args.dataset, args.subset, args.mode)
    if not data_parallel.is_main():
        return 0  # rank 0 prints the tables and writes --output
    if args.run and args.dataset is None:
        config = stored_config(args.run)
        print("\n" + markdown_table([summarize_run(config.protocol, run_name(config), outputs)]))
        differences = []
        for folder, output in zip(folders, outputs, strict=True):
            logged = read_json(os.path.join(folder, "results.json"), "seed results")["targets"]
            by_key = {(t["dataset"], t["subset"]): t["accuracy"] for t in logged}
            differences += [abs(by_key[(t["dataset"], t["subset"])] - t["accuracy"])
                            for t in output["targets"] if (t["dataset"], t["subset"]) in by_key]
        if differences:
            print(f"largest difference from the accuracy logged at training time: {max(differences):.4f} points")
    if args.output:
        atomic_write_json(args.output, {"evaluations": outputs})
        print(f"wrote {args.output}")
    return 0


def _eval_run_folder(args, extra: list[str]) -> tuple[list[str], list[str]]:
    """Move the positional run folder (`fastprompt eval runs/x`) into args.run; return the key=value words and the
    rest of `extra`. A positional run exists because torchrun's own parser takes `--run` for its `--run-path`.
    argparse puts the first positional word in RUN even when it is a key=value, and positionals after an option
    in `extra`: the run folder is the one word, wherever it landed, without '=' (a path holding '=' needs --run)."""
    from .runner.config import ConfigError

    def bare(word: str) -> bool:
        return "=" not in word and not word.startswith("-")

    options = [word for word in extra if word.startswith("-")]
    if options:  # first: the value of a stray option (`--kernels eager`) would be taken for a run folder below
        _overrides(argparse.Namespace(overrides=[]), options, "eval")
    positional = ([args.run_folder] if args.run_folder is not None else []) + list(args.overrides or [])
    folders = [word for word in positional + list(extra) if bare(word)]
    if len(folders) > 1:
        raise ConfigError(f"eval takes one run folder, got {len(folders)}: {' '.join(folders)}")
    if folders and args.run:
        raise ConfigError(f"two run folders, {folders[0]} and --run {args.run}: give one (config values are"
                          " written key=value)")
    if folders and args.checkpoint:
        raise ConfigError(f"give a run folder ({folders[0]}) or --checkpoint PATH, not both")
    if folders:
        args.run = folders[0]
    return [word for word in positional if not bare(word)], [word for word in extra if not bare(word)]


def _report(args) -> int:
    from .runner.checkpoint import atomic_write_text
    from .runner.results import csv_table, latex_table, markdown_table
    from .runner.run import load_summaries

    for option, path in (("--markdown", args.markdown), ("--csv", args.csv), ("--latex", args.latex)):
        if path:
            _check_output_path(path, option, folder=False)
    summaries = load_summaries(args.runs)
    text = markdown_table(summaries)
    if args.paper:
        from .runner.paper import paper_comparison

        text += "\n" + paper_comparison(summaries)
    print(text)
    if args.markdown:
        atomic_write_text(args.markdown, text)
    if args.csv:
        atomic_write_text(args.csv, csv_table(summaries))
    if args.latex:
        atomic_write_text(args.latex, latex_table(summaries))
    return 0


# --- export --------------------------------------------------------------------------------------------
def _export(args) -> int:
    import json

    from .data.files import read_classnames
    from .runner.export import ONNX_FORMAT, PROGRAM_FORMAT, export_file

    _check_output_path(args.output, "--output", folder=False)
    classnames = read_classnames(args.classnames) if args.classnames else None
    metadata = export_file(args.checkpoint, args.output, classnames, args.pretrained, args.dtype)
    if metadata["format"] in (PROGRAM_FORMAT, ONNX_FORMAT):
        kind = "a torch.export program" if metadata["format"] == PROGRAM_FORMAT else "an ONNX model"
        given = metadata["input"]
        print(f"wrote {args.output}: {metadata['method']} ({metadata['mode']} mode) as {kind} over"
              f" {len(metadata['classnames'])} classes for {metadata['backbone']} (pretrained="
              f"{metadata['pretrained']}), {given['dtype']} images [batch, 3, {given['shape'][2]}, {given['shape'][3]}]"
              f" normalised as in evaluation -> logits; {metadata['usage']}")
        return 0
    count = len(json.loads(metadata["classnames"]))
    print(f"wrote {args.output}: {metadata['method']} classifier over {count} classes for {metadata['backbone']}"
          f" (pretrained={metadata['pretrained']}); {metadata['usage']}")
    return 0


# --- import-dassl --------------------------------------------------------------------------------------
# Literal like METHOD_NAMES (no torch import for --help); equals fastprompt.runner.dassl_import.IMPORTABLE.
DASSL_IMPORTABLE = ("coop", "cocoop", "maple", "ivlp", "vpt_deep", "promptsrc", "mmrl")


def _import_dassl(args) -> int:
    from .data.files import read_classnames
    from .runner.dassl_import import import_dassl, parse_option

    pretrained = args.pretrained or "auto"
    if pretrained.lower() == "none":
        pretrained = None
    options = dict(parse_option(item) for item in args.option or [])
    record = import_dassl(args.path, args.method, read_classnames(args.classnames), args.output,
                          backbone=args.backbone, pretrained=pretrained, options=options)
    print(f"imported {args.method} from {record['file']} (epoch {record['epoch']}): {len(record['mapping'])}"
          f" tensors into {os.path.abspath(args.output)}")
    return 0


def _predict(args) -> int:
    from .runner.checkpoint import atomic_write_json
    from .runner.config import ConfigError
    from .data.files import read_classnames
    from .runner.engine import resolve_device
    from .runner.predict import Predictor, image_files, top_classes

    for flag, value in (("--top", args.top), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.output:
        _check_output_path(args.output, "--output", folder=False)
    device = resolve_device(args.device)
    files = image_files(args.images)  # every path checked before the model loads
    classnames = read_classnames(args.classnames) if args.classnames else None
    predictor = Predictor(args.checkpoint, classnames, device=device, pretrained=args.pretrained, mode=args.mode,
                          kernels=args.kernels)
    # An image that does not decode costs only its own line: the others are still predicted and written, each bad
    # file is named on stderr (and in the JSON), and the exit status is 1.
    unreadable: list[dict] = []
    rows = top_classes(predictor, files, top=args.top, batch_size=args.batch_size, unreadable=unreadable)
    for row in rows:
        print(f"{row['image']}: " + ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in row["top"]))
    for failure in unreadable:
        print(f"fastprompt: error: {failure['error']}", file=sys.stderr)
    if args.output:
        record = {"checkpoint": predictor.checkpoint, "mode": predictor.mode,
                  "classnames": list(predictor.classnames), "predictions": rows}
        if unreadable:
            record["unreadable"] = unreadable
        atomic_write_json(args.output, record)
        print(f"wrote {args.output}")
    if unreadable:
        print(f"fastprompt: {len(unreadable)} of {len(files)} images could not be decoded; the other"
              f" {len(files) - len(unreadable)} were predicted", file=sys.stderr)
        return 1
    return 0


def _bench(args, extra) -> int:
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.abspath(args.path or os.path.join(here, "bench"))
    if not os.path.isdir(bench):
        print(
            f"fastprompt: error: no benchmark suite at {bench}. The suite (bench/) ships with the source repository,"
            " not with an installed wheel: run this from a git checkout, or pass --path <bench folder>.",
            file=sys.stderr,
        )
        return 2
    command = [sys.executable, "-m", "pytest", bench, *extra]
    print(" ".join(command))
    return subprocess.call(command)


# --- parser --------------------------------------------------------------------------------------------
def _installed_version() -> str:
    """The installed distribution's version, read from its metadata (importing fastprompt would import torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastprompt")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastprompt", description="Fast prompt learning on frozen CLIP.")
    parser.add_argument("--version", action="version", version=f"fastprompt {_installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train and evaluate a method on the embedded procedural dataset")
    demo.add_argument("--method", default="maple", choices=sorted(METHOD_NAMES), help="prompt method (default maple)")
    demo.add_argument("--backbone", default="small", help="'small', 'tiny' or an open_clip model name")
    demo.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint file")
    demo.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    demo.add_argument("--shots", type=int, default=16,
                      help="training images per class of the procedural dataset (K of K-shot; default 16)")
    demo.add_argument("--batch-size", type=int, default=16, help="training images per step (default 16)")
    demo.add_argument("--lr", type=float, default=None, help="AdamW's peak learning rate, cosine to 0 (default 2e-3)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the dataset draw, prompts and order (default 0)")
    demo.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N")
    demo.add_argument("--kernels", default="auto",
                      help="auto (fastprompt.patch), eager (the unpatched reference path), or an attention backend")
    demo.set_defaults(func=_demo)

    info = sub.add_parser("info", help="devices, versions and kernel backends")
    info.set_defaults(func=_info)

    prepare = sub.add_parser(
        "prepare", help="check a dataset layout (optionally download it first)",
        description="Check that a dataset's files are where training will look for them (its folder under --root,"
                    " split file, class names, images) and print what was found, or the expected layout and what is"
                    " missing. Exits 1 when the layout is not usable.",
        epilog="example: fastprompt prepare eurosat --root /data --download",
    )
    prepare.add_argument("dataset", help="dataset name: " + ", ".join(DATASET_NAMES)
                         + " (Dassl names such as OxfordPets too)")
    prepare.add_argument("--root", required=True, help="folder holding one folder per dataset (imagefolder: the"
                         " folder of class folders; csv: the CSV file), as train's --root")
    prepare.add_argument("--verify", default="sample", choices=["sample", "all", "none"],
                         help="decode a seeded random sample of up to 1000 images (default), every image, or none")
    prepare.add_argument("--download", action="store_true", help="fetch and unpack the public archives first"
                         " (resumable; checked against the published checksum where there is one)")
    prepare.set_defaults(func=_prepare)

    train = sub.add_parser(
        "train", help="train a method with a paper preset (key=value overrides)",
        description="Train every seed of a method x protocol preset; overrides are key=value (see --dry-run).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  fastprompt train --method maple --protocol b2n --dataset eurosat --root /data --dry-run\n"
            "  fastprompt train --method mmrl --protocol xd --dataset imagenet --root /data seeds=1,2,3\n"
            "  fastprompt train --method coop --protocol fewshot --dataset dtd --root /data --shots 4 lr=0.004\n"
            "  fastprompt train --method clip --dataset dtd --root /data     (zero-shot: evaluates, trains nothing)\n"
            "  fastprompt train ... --resume latest                         (continue an interrupted run)\n"
            "method options are bare keys (n_ctx=4, depth=3); dataset options are dataset.<name>=value"
        ),
    )
    train.add_argument("--method", help="prompt method: " + ", ".join(sorted(METHOD_NAMES)))
    train.add_argument("--protocol", help="b2n, fewshot, xd or dg")
    train.add_argument("--dataset", help="training dataset: " + ", ".join(DATASET_NAMES)
                       + " (Dassl names such as OxfordPets are accepted too)")
    train.add_argument("--root", help="folder holding one folder per dataset (imagefolder: the folder of class"
                       " folders; csv: the CSV file)")
    train.add_argument("--shots", type=int,
                       help="training images per class, sampled as Dassl does (K of K-shot; default 16; "
                            "the fewshot protocol's papers use 1, 2, 4, 8, 16)")
    train.add_argument("--seeds", help="comma-separated seeds, e.g. 1,2,3")
    train.add_argument("--output", dest="output_dir", help="run folder")
    train.add_argument("--config", help="JSON or YAML file of config keys")
    train.add_argument("--resume", help="'latest' (the run in the output folder) or a run folder")
    train.add_argument("--dry-run", action="store_true", help="print the effective config and its diff; train nothing")
    train.add_argument("overrides", nargs="*", help="key=value config overrides")
    train.set_defaults(func=_train, takes_extra=True)

    sweep = sub.add_parser(
        "sweep", help="train methods over datasets x seeds (x shots), several runs at a time on the devices",
        description="Every (method, dataset, shots, seed) is a `fastprompt train` run in a process of its own, in a"
                    " folder of its own under --output; --jobs-per-device of them run on each device until all are"
                    " done, and the seeds are merged into one table (summary.md; `fastprompt report OUTPUT`). A failed"
                    " run ends only itself. Run the same command again to continue: complete runs are kept,"
                    " interrupted and failed ones resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  fastprompt sweep --method maple --root /data                       (b2n: 11 datasets x seeds 1,2,3)\n"
            "  fastprompt sweep --method clip,coop,cocoop,maple --root /data      (a paper's table: 4 methods)\n"
            "  fastprompt sweep --method coop --protocol fewshot --shots all --datasets dtd,eurosat --root /data\n"
            "  fastprompt sweep --method mmrl --protocol xd --root /data --devices 0,1 --jobs-per-device 2\n"
            "config overrides are key=value, as for train (lr=0.002, n_ctx=4: a method option goes to the methods"
            " that take it); --dry-run lists the runs"
        ),
    )
    sweep.add_argument("--method", required=True, help="prompt method, or several (maple,coop: one table, an Average"
                       " row each): " + ", ".join(sorted(METHOD_NAMES)))
    sweep.add_argument("--protocol", default="b2n", help="b2n (default), fewshot, xd or dg")
    sweep.add_argument("--datasets", default="all",
                       help="comma-separated training datasets, or all (default): the 11 benchmarks for b2n and"
                            " fewshot, imagenet for xd and dg")
    sweep.add_argument("--root", help="folder holding one folder per dataset")
    sweep.add_argument("--shots", default="16", help="training images per class (default 16); fewshot: a list such"
                       " as 1,2,4,8,16, or all")
    sweep.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    sweep.add_argument("--output", help="sweep folder (default runs/sweep-<method>-<protocol>)")
    sweep.add_argument("--config", help="JSON or YAML file of config keys, for every run")
    sweep.add_argument("--devices", default="auto",
                       help="auto (every visible GPU, else the CPU), cpu, or GPU indices such as 0,1,3")
    sweep.add_argument("--jobs-per-device", type=int, default=1,
                       help="runs at a time on each device (default 1; a few-shot run uses a fraction of a GPU:"
                            " fastprompt.memory.predict_for says how much)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and their states; start nothing")
    sweep.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    sweep.set_defaults(func=_sweep, takes_extra=True)

    evaluate = sub.add_parser("eval", help="evaluate saved checkpoints (never trains)")
    evaluate.add_argument("run_folder", nargs="?", metavar="RUN",
                          help="a run folder: evaluate every seed on its own targets (the same as --run RUN)")
    evaluate.add_argument("--run", help="a run folder, as RUN (under torchrun write RUN: torchrun reads --run"
                               " as its own --run-path)")
    evaluate.add_argument("--checkpoint", action="append",
                          help="a checkpoint folder, checkpoint.json, or a run folder for all its seeds (repeatable)")
    evaluate.add_argument("--dataset", help="evaluate on this dataset's test split instead: "
                          + ", ".join(DATASET_NAMES))
    evaluate.add_argument("--root", help="folder holding one folder per dataset, as train's --root (imagefolder:"
                          " the folder of class folders; csv: the CSV file); the run's own by default")
    evaluate.add_argument("--subset", default="all", choices=["all", "base", "novel"],
                          help="with --dataset: its classes to score, all (default) or b2n's base or novel half")
    evaluate.add_argument("--mode", choices=["base", "novel"], help="prediction mode (default: by class set)")
    evaluate.add_argument("--output", help="write the results as JSON")
    evaluate.add_argument("overrides", nargs="*", help="key=value: device, precision, root, eval_batch_size, ...")
    evaluate.set_defaults(func=_eval, takes_extra=True)

    report = sub.add_parser("report", help="one table from several finished runs (e.g. b2n over datasets)")
    report.add_argument("runs", nargs="+", help="run folders, or sweep folders (a row per dataset, seeds merged)")
    report.add_argument("--markdown", help="write the Markdown table here")
    report.add_argument("--csv", help="write the CSV table here")
    report.add_argument("--latex", help="write the table as a LaTeX tabular (booktabs) here")
    report.add_argument("--paper", action="store_true",
                        help="also each figure beside the papers' published one and the difference (runs of the"
                             " papers' setting: ViT-B-16, openai weights, their shots)")
    report.set_defaults(func=_report)

    predict = sub.add_parser(
        "predict", help="the most probable classes of image files from a trained checkpoint",
        description="Class probabilities of images (files, or folders of them) from a checkpoint folder, or a run"
                    " folder of one seed: the images are resized, centre-cropped and normalised as in evaluation, and"
                    " each gets one line with its --top classes. New class names (--classnames) are fine for every"
                    " method whose parameters do not depend on the class count. A file that does not decode is"
                    " named on stderr (and under 'unreadable' in --output) while the others are still predicted;"
                    " the exit status is then 1.",
    )
    predict.add_argument("checkpoint", help="checkpoint folder (runs/<run>/seed1), its checkpoint.json, or a run"
                         " folder of one seed")
    predict.add_argument("images", nargs="+", help="image files or folders of images (searched recursively)")
    predict.add_argument("--classnames", help="text file, one class name per line (default: the trained classes)")
    predict.add_argument("--top", type=int, default=5, help="classes shown per image (default 5)")
    predict.add_argument("--mode", choices=["base", "novel"], help="prediction mode (default: by class set)")
    predict.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu, cuda, cuda:N")
    predict.add_argument("--kernels", default="auto", choices=["auto", "triton", "xformers", "sdpa", "eager"],
                         help="fastprompt.patch backend (auto: the fast path), or eager: the unpatched model")
    predict.add_argument("--pretrained", help="CLIP weights, where the checkpoint's record is not on this machine")
    predict.add_argument("--batch-size", type=int, default=100, help="images per forward pass (default 100)")
    predict.add_argument("--output", help="also write the predictions as JSON")
    predict.set_defaults(func=_predict)

    export = sub.add_parser(
        "export", help="a checkpoint for use without fastprompt: a torch.export program (.pt2), ONNX (.onnx) or a"
                       " fixed classifier (.safetensors)",
        description="The --output suffix says what to write. .pt2 (every method): the model's evaluation forward as a"
                    " torch.export program, images (float32, or --dtype) normalised as in evaluation -> class logits,"
                    " any batch size; torch.export.load(path).module()(images) runs it wherever torch does, without"
                    " fastprompt or open_clip (the class names and the input's transform are in the file's"
                    " fastprompt.json)."
                    " .onnx (every method; pip install 'fastprompt[onnx]'): that program in ONNX, input 'images',"
                    " output 'logits', for onnxruntime and other ONNX runtimes."
                    " .safetensors (CoOp, deep-language or zero-shot checkpoints): the class set's normalised text"
                    " features and the logit scale; with an unmodified open_clip model, logits = logit_scale *"
                    " normalize(clip.encode_image(images)) @ text_features.T gives the method's predictions.",
    )
    export.add_argument("checkpoint", help="checkpoint folder (runs/<run>/seed1), its checkpoint.json, or a run"
                        " folder of one seed")
    export.add_argument("--output", required=True, help="the file to write: .pt2 (a program), .onnx or"
                        " .safetensors (a fixed classifier)")
    export.add_argument("--classnames", help="text file, one class name per line (default: the trained classes)")
    export.add_argument("--pretrained", help="CLIP weights, where the checkpoint's record is not on this machine")
    # The runner's precision= names (fp32, bf16, fp16) are taken too: one vocabulary should not fail in the other.
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        type=lambda name: {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name),
                        help="a program's weights, computation and input (default float32; .onnx takes float32 or"
                             " float16; fp32, bf16, fp16 as in precision= work too): the half types halve the file"
                             " and run at half precision on a GPU; the logits are float32")
    export.set_defaults(func=_export)

    dassl = sub.add_parser(
        "import-dassl", help="convert a checkpoint of the papers' Dassl code into a fastprompt checkpoint",
        description="Convert output/.../model.pth.tar-N (or model-best.pth.tar) of the official CoOp, CoCoOp,"
                    " MaPLe, IVLP, VPT, PromptSRC or MMRL trainer into a checkpoint folder that `fastprompt eval"
                    " --checkpoint` and fastprompt.runner.Predictor load. Read with torch.load(weights_only=True).",
    )
    dassl.add_argument("path", help="the Dassl checkpoint file")
    dassl.add_argument("--method", required=True, choices=DASSL_IMPORTABLE, help="the method the checkpoint trained")
    dassl.add_argument("--classnames", required=True,
                       help="text file, one class name per line, in the training label order")
    dassl.add_argument("--output", required=True, help="new checkpoint folder")
    dassl.add_argument("--backbone", help="open_clip name the run used (default ViT-B-16; required for coop)")
    dassl.add_argument("--pretrained", help="weights recorded for eval (default openai; none = random)")
    dassl.add_argument("--option", action="append",
                       help="key=value method option the file does not hold, e.g. ctx_init=\"a photo of a\""
                            " or template=\"{} texture.\" (repeatable)")
    dassl.set_defaults(func=_import_dassl)

    bench = sub.add_parser(
        "bench", help="run the benchmark suite (pytest bench/); extra arguments go to pytest",
        description="Run the benchmark suite: `python -m pytest <bench folder> ARGS...`. Every argument other than"
                    " --path is passed to pytest unchanged (e.g. fastprompt bench -k maple -x).",
        usage="fastprompt bench [-h] [--path PATH] [PYTEST ARGS ...]",
    )
    bench.add_argument("--path", help="benchmark folder (default: bench/ of the source checkout)")
    bench.set_defaults(func=_bench, takes_extra=True)
    return parser


class _UsageError(Exception):
    """A command-line argument argparse refused (unknown option, bad choice, missing value)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors end like every other failure: one line `fastprompt: error: ...` and exit status 2
    from main(), instead of the usage block and a SystemExit (subcommand parsers inherit the class)."""

    def error(self, message):
        raise _UsageError(f"{message}{self._suggestion(message)} (see `{self.prog} --help`)")

    def _suggestion(self, message: str) -> str:
        """'; did you mean X?' for a misspelt choice (a command, a --precision value, ...), from the refused action's
        own choices (argparse's wording of the choices differs between Python versions)."""
        from .keywords import closest

        found = re.match(r"argument (.+?): invalid choice: '([^']*)'", message)
        if not found:
            return ""
        for action in self._actions:
            name = "/".join(action.option_strings) or action.metavar or action.dest
            if action.choices and name == found.group(1):
                guess = closest(found.group(2), [str(choice) for choice in action.choices])
                return f"; did you mean {guess!r}?" if guess else ""
        return ""


def _unknown_options_hint(parser: argparse.ArgumentParser, command: str | None, stray: list[str]) -> str:
    """'; did you mean --method?' for each misspelt option among `stray`, from the options `command` takes."""
    import difflib

    for action in parser._actions:  # argparse keeps its subcommands' parsers on this action only
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            options = [option for sub in action.choices[command]._actions for option in sub.option_strings]
            # A stricter cut-off than for names: option strings share '--' and common stems.
            guesses = [guess[0] for item in stray if item.startswith("--")
                       and (guess := difflib.get_close_matches(item.partition("=")[0], options, n=1, cutoff=0.75))]
            return f"; did you mean {', '.join(guesses)}?" if guesses else ""
    return ""


def _check_output_path(path: str, what: str, folder: bool) -> None:
    """Refuse, before any work, an output path that cannot be written: a file where a folder is needed (or the
    reverse), a file on the way to it, or a first existing folder this user cannot write into."""
    from .runner.config import ConfigError

    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            raise ConfigError(f"{what} {path} is a file; give a folder for the run")
        if not folder and os.path.isdir(path):
            raise ConfigError(f"{what} {path} is a folder; give a file path")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: cannot create it, {parent} is not writable")


def _expected_errors() -> tuple:
    from .backbone import UnsupportedModelError
    from .backbones import WeightsFileError, WeightsUnavailableError
    from .data import CorruptImageError, DatasetError
    from .parallel.data_parallel import PeerFailed
    from .runner.checkpoint import CheckpointError
    from .runner.config import ConfigError
    from .runner.export import ExportError
    from .runner.results import ReportError
    from .runner.run import RunError
    from .training import NonFiniteLossError

    # OSError: what the operating system refused (permissions, a full disk, a path that vanished) is a problem
    # of the environment, said in one line like bad input; a bug still shows its traceback.
    return (ConfigError, DatasetError, CheckpointError, RunError, CorruptImageError, NonFiniteLossError,
            UnsupportedModelError, ReportError, ExportError, OSError, PeerFailed, WeightsFileError,
            WeightsUnavailableError)


class Terminated(KeyboardInterrupt):
    """SIGTERM received: a scheduler's time limit or preemption (SLURM, Kubernetes), `kill`, or torchrun stopping
    the other processes after one failed. A KeyboardInterrupt, so that it ends a command the way Ctrl-C does: a
    run is marked 'interrupted' in run.json and resumes from its last saved epoch."""


def _raise_terminated(signum, frame):
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def _on_sigterm(handler):
    """Install `handler` for SIGTERM and return the previous one (None where signals cannot be set: a thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    previous = _on_sigterm(_raise_terminated)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            _on_sigterm(previous)


def _note(message: str) -> None:
    print(f"fastprompt: note: {message}", file=sys.stderr)


def _main(argv) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "takes_extra", False):
            hint = _unknown_options_hint(parser, args.command, extra)
            parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    except _UsageError as error:
        print(f"fastprompt: error: {error}", file=sys.stderr)
        return 2
    try:
        # A warning of fastprompt's own (duplicate class names in predict's or export's --classnames) becomes one
        # line; runs note theirs in their own output and log as well (fastprompt.runner.run).
        with warnings_as_notes(_note, own_module_prefix="fastprompt."):
            code = args.func(args, extra) if getattr(args, "takes_extra", False) else args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is met below rather than at the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (`fastprompt report ... | head`): stop quietly, as other command-line tools do; the
        # interpreter's own flush of stdout at exit would fail again, so stdout becomes /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except _expected_errors() as error:
        from .parallel import data_parallel

        message = str(error).strip() or type(error).__name__
        if isinstance(error, data_parallel.PeerFailed):
            return 2  # rank 0's own error, which rank 0 prints
        processes = data_parallel.world_size()
        where = f" (rank {data_parallel.rank()} of {processes})" if processes > 1 else ""
        print(f"fastprompt: error{where}: {message}", file=sys.stderr)
        return 2
    except Terminated:
        print("fastprompt: terminated (SIGTERM)", file=sys.stderr)
        return 128 + 15
    except KeyboardInterrupt:
        print("fastprompt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
