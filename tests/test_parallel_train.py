"""Data-parallel training and evaluation (fastprompt.parallel.data_parallel) with two CPU processes and gloo,
started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment).

One spawn of two processes runs every two-process scenario (a process start costs seconds on a busy machine):
the library loop (TrainStep + GradientMean over sharded, per-sample-augmented batches) and a sharded evaluation,
then the runner through the CLI: a full run, a run stopped after epoch 1 and resumed, a re-evaluation of the
checkpoint, and two bad commands. This process then runs the single-process references and compares:
- the trainable parameters after two processes at global batch 8 equal one process at batch 8 (float tolerance:
  only the summation order differs), and the evaluation metrics are exactly the single-process ones;
- the resumed two-process run is bit-identical to the uninterrupted one (weights, losses, results);
- rank 1 printed nothing and made no write under the run folders (every file-system write call is recorded).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import shutil
import socket

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]
RUN_ARGS = ["--method", "maple", "--dataset", "procedural", "dataset.num_test_per_class=2",
            "dataset.num_val_per_class=1", "--shots", "2", "--seeds", "1", "backbone=tiny", "pretrained=none",
            "device=cpu", "num_workers=0", "precision=fp32", "epochs=2", "batch_size=4"]


class NoisyImages(Dataset):
    """Fixed images; every read adds noise drawn from torch's CPU RNG, as an augmentation's crop and flip draw."""

    def __init__(self, count: int = 16, seed: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(count, 3, 32, 32, generator=g)
        self.labels = torch.randint(0, len(NAMES), (count,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index] + 0.3 * torch.randn(3, 32, 32), self.labels[index]


def _model():
    import fastprompt
    from fastprompt.backbones import create_clip

    torch.manual_seed(0)
    return fastprompt.build("maple", create_clip("tiny"), NAMES)


def train_library() -> dict:
    """MaPLe trained 2 epochs x 2 steps at global batch 8 with the sharded loader (one or two processes)."""
    from fastprompt.parallel import data_parallel
    from fastprompt.training import TrainStep, make_optimizer, train_epoch

    model = _model()
    optimizer = make_optimizer(model.trainable_parameters(), "sgd", lr=0.1)
    sync = data_parallel.GradientMean() if data_parallel.world_size() > 1 else None
    step = TrainStep(model, optimizer, grad_sync=sync)
    loader = data_parallel.sharded_loader(NoisyImages(), 8, torch.Generator().manual_seed(3))
    for _ in range(2):
        train_epoch(step, loader, device="cpu")
    return {name: p.detach().clone() for name, p in model.method.named_parameters() if p.requires_grad}


def evaluate_library() -> dict:
    """Metrics of the untrained model over 13 images (an uneven split: 7 and 6), sharded when distributed."""
    from fastprompt.evaluation import evaluate
    from fastprompt.parallel import data_parallel

    test = NoisyImages(count=13, seed=9)
    pairs = list(zip(test.images, test.labels, strict=True))  # plain reads: no noise at evaluation
    loader = DataLoader(data_parallel.shard(pairs), batch_size=4)
    sharded = data_parallel.world_size() > 1
    return evaluate(_model(), loader, "cpu", reduce=data_parallel.all_reduce_sum_ if sharded else None)


# --- the two processes ------------------------------------------------------------------------------------------
def _record_writes(root: str) -> list:
    """Record every call of this process that writes, creates, renames or removes something under `root`."""
    root = os.path.abspath(root)
    seen: list = []

    def inside(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(root)

    def watch(module, name, writes=lambda *args, **kwargs: True):
        original = getattr(module, name)
        paths = 2 if name in ("rename", "replace") else 1  # a rename writes its source and its destination

        def wrapper(*args, **kwargs):
            if writes(*args, **kwargs):
                seen.extend([name, os.fspath(path)] for path in args[:paths] if inside(path))
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    watch(builtins, "open", lambda file, mode="r", *a, **k: any(c in mode for c in "wax+"))
    watch(os, "open", lambda path, flags, *a, **k: bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
    for name in ("mkdir", "makedirs", "rename", "replace", "remove", "unlink", "rmdir"):
        watch(os, name)
    watch(shutil, "rmtree")
    return seen


def _cli(*args) -> dict:
    from fastprompt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


class Interrupt(Exception):
    pass


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastprompt.parallel import data_parallel
    from fastprompt.runner import resolve_config, train_run

    runs = os.path.join(out, "runs")
    writes = _record_writes(runs)
    data_parallel.init_from_env("cpu")
    trained = train_library()
    report: dict = {"evaluation": evaluate_library()}
    if rank == 0:
        torch.save(trained, os.path.join(out, "library.pt"))

    full, resumed = os.path.join(runs, "full"), os.path.join(runs, "resumed")
    report["full"] = _cli("train", *RUN_ARGS, f"output_dir={full}")
    values = {"method": "maple", "dataset": "procedural", "dataset.num_test_per_class": "2",
              "dataset.num_val_per_class": "1", "shots": "2", "seeds": "1", "backbone": "tiny", "pretrained": "none",
              "device": "cpu", "num_workers": "0", "precision": "fp32", "epochs": "2", "batch_size": "4",
              "output_dir": resumed}

    def stop(seed, epoch):
        if epoch == 1:
            raise Interrupt("stopped after epoch 1")

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        try:
            train_run(resolve_config(overrides=values), on_epoch_end=stop)
        except Interrupt:
            report["interrupted"] = True
    report["interrupted_out"] = printed.getvalue()
    report["resumed"] = _cli("train", *RUN_ARGS, f"output_dir={resumed}", "--resume", "latest")
    # The same --output on both ranks, inside the watched folder: rank 0 alone writes it.
    report["eval"] = _cli("eval", "--checkpoint", os.path.join(full, "seed1"), "--output",
                          os.path.join(runs, "eval.json"))
    odd = [("batch_size=3" if arg == "batch_size=4" else arg) for arg in RUN_ARGS]
    report["odd_batch"] = _cli("train", *odd, f"output_dir={os.path.join(runs, 'odd')}")
    report["existing"] = _cli("train", *RUN_ARGS, f"output_dir={full}")
    report["sharded"] = _cli("train", *RUN_ARGS, "shard_text=true", f"output_dir={os.path.join(runs, 'sharded')}")
    per_image = [("cocoop" if arg == "maple" else arg) for arg in RUN_ARGS]
    report["sharded_cocoop"] = _cli("train", *per_image, "shard_text=true",
                                    f"output_dir={os.path.join(runs, 'sharded_cocoop')}")
    report["writes"] = list(writes)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:  # outside runs/
        json.dump(report, handle)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, reports


# --- comparisons --------------------------------------------------------------------------------------------------
def test_two_processes_train_like_one_at_the_same_global_batch(two_ranks):
    out, _ = two_ranks
    two = torch.load(out / "library.pt", weights_only=True)
    one = train_library()
    assert one.keys() == two.keys()
    initial = {name: p for name, p in _model().method.named_parameters() if p.requires_grad}
    for name in one:
        assert not torch.equal(one[name], initial[name]), f"{name} did not train"
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5, msg=name)


def test_sharded_evaluation_counts_equal_one_process(two_ranks):
    _, reports = two_ranks
    one = evaluate_library()
    for report in reports:
        two = report["evaluation"]
        assert two["images"] == one["images"] == 13
        assert two["accuracy"] == one["accuracy"] and two["macro_f1"] == one["macro_f1"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_runner_evaluation_equals_one_process(two_ranks):
    from fastprompt.runner.run import evaluate_checkpoints

    out, reports = two_ranks
    assert all(r["eval"]["code"] == 0 for r in reports), [r["eval"]["err"] for r in reports]
    two = json.loads((out / "runs" / "eval.json").read_text())["evaluations"][0]["targets"]
    one = evaluate_checkpoints([str(out / "runs" / "full" / "seed1")], printer=lambda line: None)[0]["targets"]
    assert [(t["accuracy"], t["macro_f1"], t["images"]) for t in two] == \
        [(t["accuracy"], t["macro_f1"], t["images"]) for t in one]


def test_resume_under_two_processes_is_exact(two_ranks):
    from safetensors.torch import load_file

    out, reports = two_ranks
    assert all(r["full"]["code"] == 0 and r["resumed"]["code"] == 0 for r in reports), reports[0]["resumed"]["err"]
    assert all(r.get("interrupted") for r in reports)
    full, resumed = out / "runs" / "full", out / "runs" / "resumed"
    assert "seed 1: resuming after epoch 1" in reports[0]["resumed"]["out"]
    a, b = load_file(full / "seed1" / "checkpoint.safetensors"), load_file(resumed / "seed1" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((run / "seed1" / "results.json").read_text()) for run in (full, resumed))
    assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]
    assert [h["images"] for h in ra["history"]] == [8, 8]  # the global count: 8 images, 4 per rank
    assert ra["targets"] == rb["targets"]
    manifest = json.loads((resumed / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["processes"] == 2


def test_only_rank_0_writes_and_prints(two_ranks):
    out, (main, other) = two_ranks
    assert other["writes"] == []
    written = {os.path.basename(path) for _, path in main["writes"]}
    assert {"run.json", "log.txt", "summary.json", "eval.json"} <= written  # the recorder sees rank 0's writes
    for key in ("full", "resumed", "eval"):
        assert other[key]["out"] == "" and other[key]["err"] == "", key
    assert "seed 1 epoch 2/2" in main["full"]["out"] and "accuracy" in main["eval"]["out"]
    # the header says the run is data-parallel (it read like a one-process run)
    assert main["full"]["out"].splitlines()[0].endswith(" on cpu, 2 processes (torchrun), each computing 1/2 of every"
                                                         " batch")
    assert other["interrupted_out"] == ""
    log = (out / "runs" / "full" / "log.txt").read_text().splitlines()
    epoch_lines = [line for line in log if line.startswith("seed 1 epoch")]
    assert len(epoch_lines) == 2, log  # one line per epoch: rank 0's
    assert sorted(os.listdir(out / "runs" / "full")) == ["log.txt", "run.json", "seed1", "summary.csv", "summary.json",
                                                         "summary.md"]


def test_bad_commands_fail_on_every_rank_without_hanging(two_ranks):
    out, (main, other) = two_ranks
    for report in (main, other):
        assert report["odd_batch"]["code"] == 2
        assert "batch_size=3 (the global batch) does not split over the 2 processes" in report["odd_batch"]["err"]
        assert report["existing"]["code"] == 2
    assert not (out / "runs" / "odd").exists()
    assert "already holds a run" in main["existing"]["err"]
    assert other["existing"]["err"] == ""  # rank 1 learns of rank 0's failure and leaves the printing to it


def test_shards_of_a_global_batch_are_rank_independent():
    """Two ranks' slices, put together, are the one-process batch: same samples, same augmentation draws."""
    from fastprompt.parallel.data_parallel import sharded_loader

    data = NoisyImages()
    one = list(sharded_loader(data, 8, torch.Generator().manual_seed(1)))
    halves = [list(sharded_loader(data, 8, torch.Generator().manual_seed(1), rank=r, world=2)) for r in range(2)]
    assert len(one) == len(halves[0]) == 2
    for step, (images, labels) in enumerate(one):
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), images)
        assert torch.equal(torch.cat([halves[0][step][1], halves[1][step][1]]), labels)
    with pytest.raises(ValueError, match="batch_size=6 does not split over 4 ranks"):
        sharded_loader(data, 6, torch.Generator(), rank=0, world=4)


def test_device_set_shards_are_rank_independent():
    """The same for the few-shot set decoded on the device (data_on_device=true), augmented there."""
    from fastprompt.data import build_dataset
    from fastprompt.parallel.data_parallel import ShardedDeviceBatches
    from fastprompt.runner.device_data import DeviceAugmentedSet

    splits = build_dataset("procedural", None, num_train_per_class=2, num_classes=4, image_size=32)
    data = DeviceAugmentedSet(splits, 32, (0.5, 1.0), "cpu")
    one = list(ShardedDeviceBatches(data, 4, torch.Generator().manual_seed(2)))
    halves = [list(ShardedDeviceBatches(data, 4, torch.Generator().manual_seed(2), rank=r, world=2)) for r in range(2)]
    assert len(one) == len(halves[1]) == 2
    for step, (images, labels) in enumerate(one):
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), images)
        assert torch.equal(torch.cat([halves[0][step][1], halves[1][step][1]]), labels)


def test_readme_torchrun_lines_parse():
    """Every command of the README's "Several GPUs" section is torchrun's (its own parser) starting the fastprompt
    command line (ours), with config values written key=value."""
    import re
    import shlex
    from pathlib import Path

    from torch.distributed.run import get_args_parser

    from fastprompt.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Several GPUs", 1)[1].split("\n#", 1)[0]
    lines = re.findall(r"^    (torchrun .*)$", section, flags=re.M)
    assert len(lines) == 3, lines
    for line in lines:
        launch = get_args_parser().parse_args(shlex.split(line)[1:])
        assert launch.module and launch.training_script == "fastprompt", line
        args, extra = build_parser().parse_known_args(launch.training_script_args)
        assert args.command in ("train", "eval") and all("=" in item for item in extra), line
    assert "--rdzv-backend c10d" in lines[2] and "--rdzv-endpoint" in lines[2] and "--nnodes 2" in lines[2]


def test_python_dash_m_fastprompt_is_the_command_line():
    """torchrun starts `python -m fastprompt`: the module runs the CLI."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fastprompt", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage: fastprompt" in done.stdout, done.stderr


def test_class_sharded_text_trains_like_the_unsharded_run(two_ranks):
    """shard_text=true: each rank encodes half of the classes' text; the run equals the unsharded two-process run
    (float summation order aside), and a method whose text depends on the image is refused on every rank."""
    from safetensors.torch import load_file

    out, reports = two_ranks
    assert all(r["sharded"]["code"] == 0 for r in reports), reports[0]["sharded"]["err"]
    full = load_file(out / "runs" / "full" / "seed1" / "checkpoint.safetensors")
    sharded = load_file(out / "runs" / "sharded" / "seed1" / "checkpoint.safetensors")
    assert full.keys() == sharded.keys()
    for name in full:
        torch.testing.assert_close(sharded[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
    for report in reports:
        assert report["sharded_cocoop"]["code"] == 2
    assert "shard_text:" in reports[0]["sharded_cocoop"]["err"] and "cocoop" in reports[0]["sharded_cocoop"]["err"]
    assert not (out / "runs" / "sharded_cocoop").exists()


def _one_rank_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = _cli("train", *RUN_ARGS, f"output_dir={os.path.join(out, 'torchrun-1')}")
    with open(os.path.join(out, "one.json"), "w") as handle:
        json.dump(result, handle)


def test_a_one_process_torchrun_run_is_the_plain_run(tmp_path):
    """Launched as torchrun --nproc_per_node 1 would (its environment, a process group of one), a run is
    bit-identical to the plain run: same loaders, same draws, same steps."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(_one_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["code"] == 0, one["err"]
    torch.set_num_threads(1)
    plain = _cli("train", *RUN_ARGS, f"output_dir={tmp_path / 'plain'}")
    assert plain["code"] == 0, plain["err"]
    a = load_file(tmp_path / "torchrun-1" / "seed1" / "checkpoint.safetensors")
    b = load_file(tmp_path / "plain" / "seed1" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = [json.loads((tmp_path / name / "seed1" / "results.json").read_text()) for name in ("torchrun-1", "plain")]
    assert [h["loss"] for h in results[0]["history"]] == [h["loss"] for h in results[1]["history"]]
    assert results[0]["targets"] == results[1]["targets"]
    assert json.loads((tmp_path / "torchrun-1" / "run.json").read_text())["processes"] == 1
