"""`fastprompt sweep`: every (method, dataset, shots, seed) a `fastprompt train` process of its own, a few at once.

The reference is the plain runner: the sweep's runs must be the runs `fastprompt train` makes one after the other
(same results, same trained tensors), a failed run must end only itself, a stopped sweep must continue where it
stopped, and the merged table must be the runner's own aggregation of the same seeds."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
from runner_support import FAST, build_eurosat, read_json, wait_for
from safetensors.torch import load_file

# The sweep assigns devices itself (device= is refused), so FAST without its device=cpu; --devices cpu instead.
TINY = [a for a in FAST if not a.startswith("device=")] + ["dataset.num_test_per_class=2",
                                                           "dataset.num_val_per_class=1"]
SWEEP = ["sweep", "--method", "coop", "--devices", "cpu", "--shots", "2", *TINY]


def run_sweep_process(*args, timeout=300):
    """The sweep as users start it (a process: it starts processes of its own)."""
    result = subprocess.run([sys.executable, "-m", "fastprompt", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout)
    return result.returncode, result.stdout, result.stderr


def seed_results(run_dir, seed):
    return read_json(os.path.join(run_dir, f"seed{seed}", "results.json"))


def test_parallel_sweep_makes_the_runs_train_makes_one_after_the_other(tmp_path, cli):
    sweep, plain = tmp_path / "sweep", tmp_path / "plain"
    code, out, err = run_sweep_process(*SWEEP, "--datasets", "procedural", "--seeds", "1,2", "--jobs-per-device", "2",
                                       "--output", sweep, "epochs=2")
    assert code == 0, err
    assert "2 at a time on cpu" in out and "coop-procedural-2shot-seed2 complete" in out
    code, _, err = cli("train", "--method", "coop", "--dataset", "procedural", "--shots", 2, "--seeds", "1,2", *TINY,
                       "device=cpu", "epochs=2", f"output_dir={plain}")
    assert code == 0, err

    for seed in (1, 2):
        run = sweep / f"coop-procedural-2shot-seed{seed}"
        assert read_json(run / "run.json")["status"] == "complete"
        assert read_json(run / "run.json")["config"]["seeds"] == [seed]
        ours, reference = seed_results(run, seed), seed_results(plain, seed)
        assert [t["accuracy"] for t in ours["targets"]] == [t["accuracy"] for t in reference["targets"]]
        trained = load_file(str(run / f"seed{seed}" / "checkpoint.safetensors"))
        expected = load_file(str(plain / f"seed{seed}" / "checkpoint.safetensors"))
        assert trained.keys() == expected.keys()
        for name in expected:
            assert (trained[name] == expected[name]).all(), name
        assert (sweep / "logs" / f"coop-procedural-2shot-seed{seed}.log").is_file()
        if len(os.sched_getaffinity(0)) >= 2:  # two jobs at once: each pinned to its half of the cores
            assert read_json(run / "run.json")["environment"]["usable_cpus"] == len(os.sched_getaffinity(0)) // 2

    # The merged table is the runner's aggregation of the same two seeds, row for row.
    assert (sweep / "summary.md").read_text().splitlines()[:3] == (plain / "summary.md").read_text().splitlines()[:3]
    code, out, err = cli("report", sweep, plain)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| coop procedural")]
    # one name from two folders: each row carries its folder, and the figures are the same
    assert [row.split(" | ")[0] for row in rows] == ["| coop procedural [sweep]", "| coop procedural [plain]"]
    assert rows[0].split(" | ")[1:] == rows[1].split(" | ")[1:]

    # The same command again: nothing left to train, the table again.
    code, out, err = run_sweep_process(*SWEEP, "--datasets", "procedural", "--seeds", "1,2", "--jobs-per-device", "2",
                                       "--output", sweep, "epochs=2")
    assert code == 0, err
    assert "2 complete already, 0 to resume, 0 to start" in out and "started" not in out


def test_several_methods_make_one_table_and_method_options_go_where_they_apply(tmp_path, cli):
    sweep = tmp_path / "sweep"
    code, out, err = run_sweep_process("sweep", "--method", "coop,vpt_deep", "--devices", "cpu", "--shots", "2",
                                       *TINY, "--datasets", "procedural", "--seeds", "1", "--jobs-per-device", "2",
                                       "--output", sweep, "epochs=2", "n_ctx=4")
    assert code == 0, err
    assert "2 runs (2 methods x 1 dataset x 1 shot count x 1 seed)" in out
    coop, vpt = (read_json(sweep / f"{m}-procedural-2shot-seed1" / "run.json")["config"] for m in ("coop", "vpt_deep"))
    assert coop["method"] == "coop" and coop["options"]["n_ctx"] == 4  # n_ctx went to the method that takes it
    assert vpt["method"] == "vpt_deep" and "n_ctx" not in vpt["options"]
    table = (sweep / "summary.md").read_text()
    assert "| coop procedural |" in table and "| vpt_deep procedural |" in table


def test_a_failed_run_ends_only_itself_and_the_same_command_continues(tmp_path, cli):
    root, sweep = tmp_path / "data", tmp_path / "sweep"
    (root / "eurosat").mkdir(parents=True)  # a dataset folder without its images: that run fails as it starts
    args = [*SWEEP, "--datasets", "procedural,eurosat", "--seeds", "1", "--root", root, "--output", sweep, "epochs=2"]
    code, out, err = run_sweep_process(*args)
    assert code == 1, err
    assert "coop-procedural-2shot-seed1 complete" in out
    failure = next(line for line in out.splitlines() if "coop-eurosat-2shot-seed1 FAILED" in line)
    assert "fastprompt: error: " in failure and "EuroSAT" in failure and str(sweep / "logs") in failure
    assert "1 of 2 runs failed: coop-eurosat-2shot-seed1" in out
    assert not (sweep / "summary.json").exists()
    # report: the complete dataset, and a note naming what is missing.
    code, out, err = cli("report", sweep)
    assert code == 0, err
    assert "| coop procedural |" in out and "eurosat" not in out
    assert "coop-eurosat-2shot-seed1" in err

    shutil.rmtree(root / "eurosat")
    build_eurosat(root)
    code, out, err = run_sweep_process(*args)
    assert code == 0, err
    assert "1 complete already, 0 to resume, 1 to start" in out
    assert "started coop-procedural" not in out and "coop-eurosat-2shot-seed1 complete" in out
    table = (sweep / "summary.md").read_text()
    assert "| coop procedural |" in table and "| coop eurosat |" in table and "| **Average** | 2 datasets |" in table



def test_sigterm_stops_every_run_resumably_and_the_same_command_finishes_them(tmp_path):
    sweep = tmp_path / "sweep"
    args = [*SWEEP, "--datasets", "procedural", "--seeds", "1,2", "--jobs-per-device", "2", "--output", sweep,
            "epochs=40", "batch_size=4"]
    process = subprocess.Popen([sys.executable, "-m", "fastprompt", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    logs = [sweep / f"coop-procedural-2shot-seed{seed}" / "log.txt" for seed in (1, 2)]
    try:
        wait_for(lambda: all(log.exists() and "epoch 2/40" in log.read_text() for log in logs), 240,
                 "epoch 2 in both runs")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, (out, err)
    assert err.strip().splitlines()[-1] == "fastprompt: terminated (SIGTERM)"
    assert "sweep stopped: 2 runs interrupted" in out
    for seed in (1, 2):
        run = sweep / f"coop-procedural-2shot-seed{seed}"
        assert read_json(run / "run.json")["status"] == "interrupted"
        assert not (run / "run.lock").exists()  # each job ended (its lock went with it), none was killed mid-write

    code, out, err = run_sweep_process(*args)
    assert code == 0, err
    assert "0 complete already, 2 to resume, 0 to start" in out
    for seed in (1, 2):
        run = sweep / f"coop-procedural-2shot-seed{seed}"
        assert "resuming after epoch" in (run / "log.txt").read_text()
        assert len(seed_results(run, seed)["history"]) == 40


@pytest.mark.parametrize("extra, message", [
    (["seeds=1"], "seeds= is set per job by the sweep; give --seeds instead"),
    (["device=cuda"], "device= is set per job by the sweep; give --devices instead"),
    (["output_dir=x"], "output_dir= is set per job by the sweep; give --output instead"),
    (["--seeds", "1,1"], "--seeds names 1 twice"),
    (["--seeds", "1,x"], "--seeds must be comma-separated integers"),
    (["--shots", "2,4"], "several --shots make the fewshot protocol's table"),
    (["--jobs-per-device", "0"], "--jobs-per-device must be a positive integer"),
    (["--datasets", "eurosat"], "--root is needed"),
    (["--datasets", "nosuch"], "--datasets: unknown dataset 'nosuch'"),
    (["lr=abc"], "lr"),
    (["dataset.generate_split=true"], "no dataset of the sweep (procedural) has the option 'generate_split'"),
    (["depth=3"], "depth: neither a config key nor an option of coop"),
])
def test_bad_input_is_one_line_before_anything_starts(tmp_path, cli, extra, message):
    code, out, err = cli(*SWEEP, "--datasets", "procedural", "--output", tmp_path / "sweep", *extra)
    assert code == 2, (out, err)
    assert err.startswith("fastprompt: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


def test_a_folder_of_another_sweep_or_of_something_else_is_refused(tmp_path, cli):
    sweep = tmp_path / "sweep"
    code, _, err = cli(*SWEEP, "--datasets", "procedural", "--seeds", "1", "--output", sweep, "epochs=2", "--dry-run")
    assert code == 0, err
    assert not sweep.exists()  # a dry run writes nothing
    code, _, err = run_sweep_process(*SWEEP, "--datasets", "procedural", "--seeds", "1", "--output", sweep, "epochs=2")
    assert code == 0, err
    code, _, err = cli(*SWEEP, "--datasets", "procedural", "--seeds", "1", "--output", sweep, "epochs=3", "lr=0.1")
    assert code == 2
    assert "holds a sweep started with other settings (overrides: epochs=2 now 3, lr=0.1 is new)" in err
    for command in (("eval", sweep), ("train", "--resume", sweep)):  # a run's command given the sweep's folder
        code, _, err = cli(*command)
        assert code == 2 and "it is a sweep's folder" in err and str(sweep / "coop-procedural-2shot-seed1") in err

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = cli(*SWEEP, "--datasets", "procedural", "--output", other)
    assert code == 2 and "is not empty and holds no sweep" in err


def test_torchrun_is_refused(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    code, _, err = cli(*SWEEP, "--datasets", "procedural", "--output", tmp_path / "sweep")
    assert code == 2 and "run it without torchrun" in err


def test_jobs_start_with_the_largest_class_sets():
    """ImageNet's runs take longest: started first they overlap the rest instead of ending the sweep alone. Class
    counts are the published ones (ImageNet 1,000, SUN397 397, Stanford Cars 196, Flowers 102, Food-101 and
    UCF101 101, Caltech101 and FGVC Aircraft 100, DTD 47, Pets 37, EuroSAT 10); ties keep the datasets' order."""
    from fastprompt.data.protocols import CROSS_DATASET_TARGETS
    from fastprompt.runner.sweep import Sweep

    sweep = Sweep(("maple",), "b2n", ("imagenet", *CROSS_DATASET_TARGETS), (16,), (1, 2), "/data", {}, {}, "/out")
    jobs = sweep.jobs()
    assert [j.dataset for j in jobs[::2]] == ["imagenet", "sun397", "stanford_cars", "oxford_flowers", "food101",
                                               "ucf101", "caltech101", "fgvc_aircraft", "dtd", "oxford_pets",
                                               "eurosat"]
    assert [j.seed for j in jobs[:2]] == [1, 2] and jobs[0].run_dir == "/out/maple-imagenet-16shot-seed1"
    fewshot = Sweep(("coop",), "fewshot", ("dtd",), (1, 16, 4), (1,), "/data", {}, {}, "/out").jobs()
    assert [j.name for j in fewshot] == ["coop-dtd-16shot-seed1", "coop-dtd-4shot-seed1", "coop-dtd-1shot-seed1"]


def test_dataset_options_go_to_the_datasets_that_take_them():
    from fastprompt.runner.sweep import Sweep

    sweep = Sweep(("coop", "vpt_deep"), "b2n", ("procedural", "eurosat"), (2,), (1,), "/data", {},
                  {"lr": "0.1", "dataset.num_test_per_class": "2", "dataset.generate_split": "true", "n_ctx": "4",
                   "vision_depth": "6"}, "/out")
    jobs = {(j.method, j.dataset): j for j in sweep.jobs()}
    procedural, eurosat = jobs["coop", "procedural"], jobs["coop", "eurosat"]
    assert sweep.job_overrides(procedural) == {"lr": "0.1", "dataset.num_test_per_class": "2", "n_ctx": "4"}
    assert sweep.job_overrides(eurosat) == {"lr": "0.1", "dataset.generate_split": "true", "n_ctx": "4"}
    # vpt_deep's prompts are vision tokens: n_ctx is CoOp's option, vision_depth VPT's.
    assert sweep.job_overrides(jobs["vpt_deep", "eurosat"]) == {"lr": "0.1", "dataset.generate_split": "true",
                                                                 "vision_depth": "6"}
    assert "--root" not in sweep.train_arguments(procedural)  # drawn in memory, it refuses a root
    assert sweep.train_arguments(eurosat)[-5:] == ["--root", "/data", "lr=0.1", "dataset.generate_split=true",
                                                   "n_ctx=4"]


def test_device_slots_follow_the_visible_gpus_and_share_the_cores(monkeypatch):
    import torch

    from fastprompt.runner.config import ConfigError
    from fastprompt.runner.sweep import device_slots

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7, 8}, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")  # this process's GPU 1 is the machine's GPU 6
    slots = device_slots("1,2", 2)
    # Round-robin: two jobs go to two GPUs, not both to the first.
    assert [(s.label, s.env["CUDA_VISIBLE_DEVICES"], s.cpus) for s in slots] == [
        ("cuda:1", "6", (0, 1)), ("cuda:2", "7", (2, 3)), ("cuda:1#1", "6", (4, 5)), ("cuda:2#1", "7", (6, 7))]
    assert {s.env["OMP_NUM_THREADS"] for s in slots} == {"2"}
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in device_slots("auto", 1)] == ["4", "6", "7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in device_slots("auto", 1)] == ["0", "1", "2"]
    with pytest.raises(ConfigError, match="no GPU 3 here"):
        device_slots("0,3", 1)
    # The CPU: no job sees a GPU; more slots than cores: one thread each, nobody pinned.
    cpu = device_slots("cpu", 3)
    assert [(s.env, s.cpus) for s in cpu] == [({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "3"}, (0, 1, 2)),
                                              ({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "3"}, (3, 4, 5)),
                                              ({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "3"}, (6, 7, 8))]
    crowded = device_slots("cpu", 12)
    assert {s.cpus for s in crowded} == {None} and {s.env["OMP_NUM_THREADS"] for s in crowded} == {"1"}


def test_few_shot_tables_of_several_shot_counts_average_per_shot_count():
    """A few-shot sweep over --shots 1,16 and two datasets: one Average row per shot count (an average over shot
    counts is no figure of any paper)."""
    import csv
    import io

    from fastprompt.runner.results import csv_table, summarize_run

    def run(dataset, shots, accuracy):
        summary = summarize_run("fewshot", f"coop {dataset} {shots}-shot", [{"seed": 1, "targets": [
            {"dataset": dataset, "subset": "all", "mode": "base", "accuracy": accuracy, "macro_f1": accuracy}]}])
        summary["config"] = {"method": "coop", "shots": shots}
        return summary

    rows = list(csv.reader(io.StringIO(csv_table([run("dtd", 1, 40.0), run("dtd", 16, 60.0),
                                                  run("eurosat", 1, 50.0), run("eurosat", 16, 80.0)]))))[1:]
    assert [r[0] for r in rows] == ["coop dtd 1-shot", "coop eurosat 1-shot", "Average coop 1-shot",
                                    "coop dtd 16-shot", "coop eurosat 16-shot", "Average coop 16-shot"]
    assert float(rows[2][3]) == 45.0 and float(rows[5][3]) == 70.0


def test_a_job_killed_by_a_signal_is_said_so():
    from fastprompt.runner.sweep import _killed

    assert _killed(0) is None and _killed(2) is None
    assert _killed(-9).startswith("killed by SIGKILL: out of host memory")
    assert _killed(-11) == "killed by SIGSEGV (running the sweep again resumes it)"


def test_time_left_expects_each_job_to_take_what_its_kind_took():
    from fastprompt.runner.sweep import Sweep, time_left

    jobs = {j.name: j for j in Sweep(("coop",), "b2n", ("imagenet", "dtd"), (16,), (1, 2, 3), "/d", {}, {},
                                     "/o").jobs()}
    took = {("coop", "imagenet", 16, 1): 600.0, ("coop", "dtd", 16, 1): 60.0}
    pending = [jobs["coop-imagenet-16shot-seed3"], jobs["coop-dtd-16shot-seed3"]]
    running = [(jobs["coop-imagenet-16shot-seed2"], 500.0), (jobs["coop-dtd-16shot-seed2"], 90.0)]
    # pending: 600 + 60; running: 100 left of ImageNet's 600, DTD's already past its 60 (0); over 2 slots.
    assert time_left(pending, running, took, 2) == (600 + 60 + 100 + 0) / 2
    assert time_left(pending, running, {}, 2) is None  # nothing finished: no estimate
    # Without sizes, a kind not seen yet takes the mean of all finished jobs.
    eurosat = Sweep(("coop",), "b2n", ("eurosat",), (16,), (1,), "/d", {}, {}, "/o").jobs()
    assert time_left(eurosat, [], took, 1) == 330.0
    # With them, its classes x shots at its method's rate per unit: (600 + 60) s over (1000 + 47) x 16 units, times
    # EuroSAT's 10 x 16; not ImageNet's scale.
    sizes = {("coop", "imagenet", 16, 1): 1000 * 16, ("coop", "dtd", 16, 1): 47 * 16}
    assert eurosat[0].classes == 10
    assert time_left(eurosat, [], took, 1, sizes) == pytest.approx(660 / (1047 * 16) * 160)
    # Another method's jobs count only when the job's own method has none finished.
    maple = Sweep(("maple",), "b2n", ("eurosat",), (16,), (1,), "/d", {}, {}, "/o").jobs()
    took_maple = {**took, ("maple", "dtd", 16, 1): 94.0}
    sizes_maple = {**sizes, ("maple", "dtd", 16, 1): 47 * 16}
    assert time_left(maple, [], took_maple, 1, sizes_maple) == pytest.approx(94 / 47 * 10)
    assert time_left(maple, [], took, 1, sizes) == pytest.approx(660 / (1047 * 16) * 160)
