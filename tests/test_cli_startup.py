"""First contact with the command line: help and argument errors answer without importing torch, the help
texts say what the options mean, and `fastprompt bench` hands its other arguments to pytest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

import fastprompt
from fastprompt.cli import DATASET_NAMES, METHOD_NAMES, build_parser
from fastprompt.data import known_dataset_names

# Runs the CLI in a fresh interpreter and reports the exit code and which heavy modules it imported. A fresh
# process is needed: this test session has imported torch already.
_PROBE = textwrap.dedent("""
    import sys
    from fastprompt.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
    heavy = sorted(m for m in ("torch", "open_clip", "numpy", "triton", "PIL") if m in sys.modules)
    print("EXIT", code, "HEAVY", ",".join(heavy) or "-")
""")


def _probe(*args):
    result = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120)
    last = result.stdout.strip().splitlines()[-1].split()
    return int(last[1]), last[3], result.stdout, result.stderr


@pytest.mark.parametrize("args", [
    ["--help"], ["train", "--help"], ["eval", "--help"], ["demo", "--help"], ["bench", "--help"],
    ["report", "--help"], ["prepare", "--help"], ["info", "--help"],
])
def test_help_imports_no_torch(args):
    code, heavy, out, err = _probe(*args)
    assert code == 0, err
    assert heavy == "-", f"`fastprompt {' '.join(args)}` imported {heavy}"
    assert "usage: fastprompt" in out


def test_version_is_the_package_version_without_torch():
    code, heavy, out, _ = _probe("--version")
    assert code == 0 and heavy == "-"
    assert out.splitlines()[0] == f"fastprompt {fastprompt.__version__}"


@pytest.mark.parametrize("args, message", [
    (["demo", "--method", "nope"], "invalid choice: 'nope'"),
    (["train", "--shots", "many"], "invalid int value: 'many'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["report"], "the following arguments are required: runs"),
    # A misspelt choice or option gets the closest one, from the parser's own choices and options.
    (["trian"], "; did you mean 'train'? (see `fastprompt --help`)"),
    (["demo", "--method", "mapel"], "; did you mean 'maple'? (see `fastprompt demo --help`)"),
    (["report", "--papr", "runs/x"], "unrecognized arguments: --papr; did you mean --paper? (see `fastprompt --help`)"),
    (["predict", "--topp", "3", "ck", "a.jpg"], "unrecognized arguments: --topp; did you mean --top?"),
    (["report", "--zzz", "runs/x"], "unrecognized arguments: --zzz (see `fastprompt --help`)"),
])
def test_argument_errors_import_no_torch(args, message):
    code, heavy, _, err = _probe(*args)
    assert code == 2
    assert message in err
    assert heavy == "-", f"`fastprompt {' '.join(args)}` imported {heavy}"


def test_help_answers_in_well_under_a_second():
    # Measured end to end, interpreter start included. Importing torch + open_clip took 4-8 s here; the bound
    # is generous for a loaded CI machine and still fails if they come back.
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fastprompt.cli", "train", "--help"], capture_output=True,
                            text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 2.0, f"`fastprompt train --help` took {elapsed:.2f} s"


def test_literal_names_match_the_registries():
    assert sorted(METHOD_NAMES) == sorted(fastprompt.METHODS)
    assert tuple(DATASET_NAMES) == tuple(known_dataset_names())


def test_package_names_still_resolve():
    # The package's public names load on first use; each must be the real object.
    from fastprompt.fast import patch as real_patch
    from fastprompt.methods import build as real_build

    assert fastprompt.patch is real_patch and fastprompt.build is real_build
    assert set(fastprompt.__all__) <= set(dir(fastprompt))
    for name in fastprompt.__all__:
        assert getattr(fastprompt, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastprompt.nope  # noqa: B018
    # In a fresh process (here every submodule is loaded already): `import fastprompt` alone loads nothing
    # heavy, and the README's fastprompt.memory / fastprompt.runner calls still reach their submodules.
    code = ("import sys, fastprompt; assert 'torch' not in sys.modules; "
            "print(fastprompt.memory.predict_for.__name__, fastprompt.runner.predict.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["predict_for", "predict"]


def _subcommand_help(name: str) -> str:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    return action.choices[name].format_help()


def test_shots_dataset_and_method_help_texts():
    train = " ".join(_subcommand_help("train").split())  # argparse wraps lines: compare word streams
    assert "--shots SHOTS training images per class" in train
    for name in DATASET_NAMES:
        assert name in train, f"--dataset help does not list {name}"
    for name in METHOD_NAMES:
        assert name in train
    demo = " ".join(_subcommand_help("demo").split())
    assert "--shots SHOTS training images per class of the procedural dataset" in demo
    evaluate = " ".join(_subcommand_help("eval").split())
    assert "eurosat" in evaluate and "imagenet_sketch" in evaluate


def test_bench_help_says_other_arguments_go_to_pytest():
    text = " ".join(_subcommand_help("bench").split())
    assert "passed to pytest" in text and "[PYTEST ARGS ...]" in text


def test_bench_passes_other_arguments_to_pytest(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_two.py").write_text("def test_alpha():\n    pass\n\n\ndef test_beta():\n    pass\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-m", "fastprompt.cli", "bench", "--path", str(suite), "-k", "beta",
                             "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 deselected" in result.stdout


# --- data before weights ----------------------------------------------------------------------------------
_PRETRAINED = ["--method", "coop", "--protocol", "b2n", "--dataset", "eurosat", "backbone=ViT-B-16",
               "pretrained=openai", "device=cpu", "num_workers=0", "precision=fp32"]


@pytest.fixture
def weight_loads(monkeypatch):
    """Records every backbone load of the runner instead of doing it (a ViT-B/16 download would take minutes)."""
    import fastprompt.runner.run as run

    calls = []

    def record(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(run, "load_backbone", record)
    return calls


@pytest.mark.parametrize("layout", ["no root", "empty root"])
def test_train_checks_the_data_before_loading_weights(tmp_path, capsys, weight_loads, layout):
    from fastprompt.cli import main

    root = tmp_path / "data"
    if layout == "empty root":
        root.mkdir()
    code = main(["train", *_PRETRAINED, "--root", str(root), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert weight_loads == []
    # (the layout error goes on with the expected tree, on lines of its own)
    assert err.startswith("fastprompt: error: ") and "Traceback" not in err
    expected = "does not exist" if layout == "no root" else "EuroSAT dataset folder not found"
    assert expected in err.splitlines()[0] and str(root) in err.splitlines()[0]
    assert not (tmp_path / "run").exists()


def test_train_without_data_fails_fast_offline(tmp_path):
    """End to end in a fresh process, with the hub pointed at a local socket that counts connections: before
    the fix the pretrained download came first (the hub client retried for ~50 s offline) and the error was
    about the weights; now the data error comes first and nothing touches the network."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    connections, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            connections.append(conn)
            conn.close()  # the client sees a dropped connection, as offline

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}"}
    try:
        result = subprocess.run([sys.executable, "-m", "fastprompt.cli", "train", *_PRETRAINED,
                                 "--root", str(tmp_path / "missing"), "--output", str(tmp_path / "run")],
                                capture_output=True, text=True, timeout=300, env=env)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert result.returncode == 2, result.stderr
    assert "dataset root" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert connections == [], f"{len(connections)} connection(s) to the hub before the data error"
    assert not (tmp_path / "run").exists()


# --- fastprompt info: what each op runs on ------------------------------------------------------------
_RUNS_ON = {"torch": "pytorch", "triton": "triton"}


def test_info_op_plan_matches_a_patched_clip():
    """info's per-op claims for the CPU against what patch() really chose for a CPU CLIP, and what a MaPLe
    model on it really does with its coupling maps."""
    from fastprompt.backbones import create_clip
    from fastprompt.info import info

    rows = {r["op"]: r for r in info()["ops"] if r["device"] == "cpu"}
    assert set(rows) == {"LayerNorm", "MLP", "coupling maps", "attention", "prefix attention"}
    clip = fastprompt.patch(create_clip("tiny"))
    path = clip.fastprompt_patch
    assert rows["LayerNorm"]["runs_on"] == rows["MLP"]["runs_on"] == _RUNS_ON[path.kernels.norm_mlp]
    for tower in ("vision", "text"):
        line = next(r for r in path.reasons if r.startswith(f"{tower} attention"))
        assert line.endswith(f"-> {rows['attention']['runs_on']}")
    model = fastprompt.build("maple", clip, ["red circle", "blue square"])
    grouped = model.grouped_maps() is not None
    assert grouped == rows["coupling maps"]["runs_on"].endswith("grouped")
    if not torch_cuda_available():  # a CPU runs no Triton kernel under auto, interpreter or not
        assert all("triton" not in r["runs_on"] for r in rows.values())


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_info_lists_every_op_for_every_device_and_no_false_triton_claim():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the user's view
    result = subprocess.run([sys.executable, "-m", "fastprompt.cli", "info"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    devices = ["cpu"] + [f"cuda:{i}" for i in range(_cuda_count())]
    for device in devices:
        for op in ("LayerNorm", "MLP", "coupling maps", "attention", "prefix attention"):
            assert any(line.split()[:1] == [device] and f" {op} " in line for line in lines), (device, op)
    mode = next(line for line in lines if line.strip().startswith("triton mode"))
    if len(devices) == 1:
        assert "compiled" not in mode and "no kernel runs" in mode, mode


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


# --- help(fastprompt.patch) ---------------------------------------------------------------------------
def test_help_of_patch_holds_the_explanation():
    import pydoc

    text = " ".join(pydoc.render_doc(fastprompt.patch, renderer=pydoc.plaintext).split())
    assert "See the module docstring" not in text  # a pointer help() cannot follow: the name is shadowed
    for needle in ("class swap", "state_dict", "last EOT", "FastPath", "backend: 'auto'", "unpatch",
                   "UnsupportedModelError", "fastprompt info"):
        assert needle in text, f"help(fastprompt.patch) lacks {needle!r}"
    # and what it says about the instance is true: a class swap, the same state_dict, undone by unpatch
    from fastprompt.backbones import create_clip

    clip = create_clip("tiny")
    before_class, before_keys = type(clip.transformer.resblocks[0]), list(clip.state_dict())
    fastprompt.patch(clip)
    assert type(clip.transformer.resblocks[0]) is not before_class
    assert isinstance(clip.transformer.resblocks[0], before_class) and list(clip.state_dict()) == before_keys
    fastprompt.unpatch(clip)
    assert type(clip.transformer.resblocks[0]) is before_class


def test_a_closed_pipe_ends_the_command_quietly():
    """`fastprompt ... | head`: the reader goes away; the command stops with status 141 (as SIGPIPE would end a C
    tool) and prints nothing, instead of an error line or Python's 'Exception ignored ... BrokenPipeError'."""
    read, write = os.pipe()
    os.close(read)  # a reader that has gone before the first line
    try:
        result = subprocess.run([sys.executable, "-m", "fastprompt", "train", "--method", "coop", "--dataset",
                                 "procedural", "--dry-run"], stdout=write, stderr=subprocess.PIPE, text=True,
                                timeout=300)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")
