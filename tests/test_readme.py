"""The README's code runs: every fenced block, and every `fastprompt ...` command quoted inline, is executed or
parsed here, so that a stale command (a flag removed, a positional that became an option) fails CI.

What is substituted, and why (the README uses real data and weights; CI has a CPU and no network):
- shell: `/data` -> a fake EuroSAT in a temp dir (tests/runner/runner_support.py); training commands get
  the tiny random-weight backbone on the CPU, 2 shots, 1 epoch, and keep the README's run folder name
  (`--output runs/maple-b2n-eurosat-16shot`) so that the later `eval` / `report` lines run unchanged;
  `fastprompt train ...` (the README's ellipsis) repeats the training command above it; the demo runs on
  the tiny backbone for 1 epoch.
- python: `open_clip.create_model("ViT-B-16-quickgelu", pretrained="openai")` -> the tiny CLIP; the names a block
  uses but does not define (images, labels, novel_names, model, loader, epochs) are given tiny values;
  `device="cuda"` -> the CPU when there is no GPU.
- skipped, with the reason in SKIPPED: creating a venv and the pip install (network, ~5 GB; their
  arguments are checked against constraints.txt and pyproject.toml instead) and the whole test suite
  (which contains this test).
A command that none of these rules covers fails the test: a new README command must be classified here.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

import fastprompt
from fastprompt.backbones import create_clip
from fastprompt.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
sys.path.insert(0, str(REPO / "tests" / "runner"))
from runner_support import COLOURS, build_eurosat, build_imagenet, write_image  # noqa: E402

FAST = ["backbone=tiny", "pretrained=none", "device=cpu", "num_workers=0", "precision=fp32", "epochs=1",
        "warmup_epochs=0", "batch_size=2", "--shots", "2"]
SKIPPED = {
    "python3 -m venv .venv": "creates a virtual environment; the install it prepares needs the network",
    ".venv/bin/python -m pytest -q": "the whole test suite, which contains this test",
}


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: comments dropped, `a && b` split."""
    commands = []
    for line in body.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def test_readme_has_the_blocks_this_test_knows():
    # If blocks are added or removed, this test (and its substitutions) must be revisited.
    languages = [language for language, _ in fenced_blocks(README)]
    assert languages == ["bash", "python", "bash", "python"], languages


def _fastprompt(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _check_install(command: str) -> None:
    """`.venv/bin/pip install -c constraints.txt -e ".[test]"`: the files and the extra it names exist."""
    words = shlex.split(command)
    assert words[:2] == [".venv/bin/pip", "install"], command
    constraints = words[words.index("-c") + 1]
    assert (REPO / constraints).is_file(), constraints
    editable = words[words.index("-e") + 1]
    path, extra = re.fullmatch(r"(.*)\[(\w+)\]", editable).groups()
    assert (REPO / path / "pyproject.toml").is_file()
    # The extra's line in its table (read as text: tomllib is in the standard library only from Python 3.11).
    extras = (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]\n")[1].split("\n[")[0]
    assert re.search(rf"^{extra} = \[", extras, re.M), extra
    assert "torch===2.13.0" in (REPO / constraints).read_text()  # the pin the README explains


def test_set_up_block(tmp_path, monkeypatch, capsys):
    body = fenced_blocks(README)[0][1]
    ran_demo = 0
    for command in shell_commands(body):
        if command in SKIPPED:
            continue
        if command.startswith(".venv/bin/pip install"):
            _check_install(command)
        elif command.startswith(".venv/bin/fastprompt demo"):
            args = shlex.split(command)[1:] + ["--backbone", "tiny", "--epochs", "1", "--shots", "2",
                                               "--device", "cpu"]
            code, out, err = _fastprompt(args, capsys)
            # 1 is "did not beat chance", a result of one tiny epoch; 2 would be a rejected command
            assert code in (0, 1), err
            assert "accuracy" in out.lower(), out
            ran_demo += 1
        else:
            pytest.fail(f"README command not covered by tests/test_readme.py: {command!r}")
    assert ran_demo == 1


def test_training_block_runs_in_order(tmp_path, monkeypatch, capsys):
    """The `fastprompt prepare / train / eval / report / predict / --resume / own data` block, top to bottom, in one
    folder."""
    data = tmp_path / "data"
    build_eurosat(data)
    build_imagenet(data)  # the eval line that scores the EuroSAT prompts on another dataset
    # A user's own data for the imagefolder / csv lines (the same images both ways) and photos/ for predict.
    rows = ["path,classname"]
    for label, name in enumerate(["red fox", "green frog", "blue jay", "gold fish"]):
        for k in range(8):
            write_image(tmp_path / "my_images" / name / f"{k}.png", COLOURS[label], seed=label * 10 + k)
            rows.append(f"my_images/{name}/{k}.png,{name}")
    (tmp_path / "my_images.csv").write_text("\n".join(rows) + "\n")
    for k in range(2):
        write_image(tmp_path / "photos" / f"{k}.jpg", COLOURS[k], seed=100 + k)
    monkeypatch.chdir(tmp_path)
    body = fenced_blocks(README)[2][1]
    last_train = None
    seen = []
    for command in shell_commands(body):
        words = shlex.split(command)
        assert words[0] == "fastprompt", command
        words = [str(data) if w == "/data" else w for w in words[1:]]
        if words[:2] == ["train", "..."]:
            assert last_train is not None, "`fastprompt train ...` before any full train command"
            words = last_train + words[2:]
        if words[0] == "train" and "--dry-run" not in words and "--resume" not in words:
            last_train = list(words)
        if words[0] == "train":
            words = words + FAST
            dataset = words[words.index("--dataset") + 1] if "--dataset" in words else "eurosat"
            if "--dry-run" not in words:
                words += ["--output", "runs/maple-b2n-eurosat-16shot" if dataset == "eurosat" else f"runs/{dataset}"]
        elif words[0] == "predict":
            words = words + ["--device", "cpu"]
        elif words[0] == "report":
            words = ["report"] + [p for w in words[1:] for p in (sorted(glob.glob(w)) or [w])]
        code, out, err = _fastprompt(words, capsys)
        assert code == 0, f"`fastprompt {' '.join(words)}` exited {code}: {err}"
        assert "Traceback" not in err
        seen.append(words[0] + (" --resume" if "--resume" in words else "")
                    + (" --dry-run" if "--dry-run" in words else ""))
        if words[0] == "eval" and "--checkpoint" in words:
            assert out.count("imagenet ") == 3  # each of the run's 3 seeds on the other dataset
        elif words[0] == "eval":
            assert "| maple" in out  # the run's table
        if words[0] == "report":
            assert "eurosat" in out
            assert (tmp_path / "table.tex").read_text().startswith(r"\begin{tabular}")
        if words[0] == "predict":
            # 2 images; --top 3 capped at the run's 2 base classes (b2n trains on half the fake EuroSAT's 4).
            assert out.splitlines()[0].startswith("photos/0.jpg: ") and out.count("%") == 2 * 2
    assert seen == ["prepare", "train --dry-run", "train", "eval", "eval", "report", "predict", "train --resume",
                    "train", "train"], seen
    assert os.path.isfile(tmp_path / "runs" / "maple-b2n-eurosat-16shot" / "summary.json")


def _undefined_names() -> dict:
    """Tiny stand-ins for the names the README's Python blocks use without defining."""
    torch.manual_seed(0)
    return {
        "torch": torch,
        "images": torch.randn(2, 3, 32, 32),
        "labels": torch.tensor([0, 1]),
        "novel_names": ["fox", "owl"],
        "epochs": 1,
    }


def _python_block(index: int) -> str:
    code = fenced_blocks(README)[index][1]
    original = 'open_clip.create_model("ViT-B-16-quickgelu", pretrained="openai")'
    if index == 1:
        assert original in code, "the README's first Python block changed: update the substitution"
        code = code.replace(original, 'create_clip("tiny")')
    if not torch.cuda.is_available():
        code = code.replace('device="cuda"', 'device="cpu"')
    return code


def test_python_api_block():
    namespace = {"create_clip": create_clip, **_undefined_names()}
    exec(compile(_python_block(1), "README.md[python 1]", "exec"), namespace)
    assert namespace["logits"].shape == (2, 3)  # 2 images x the block's 3 class names
    assert fastprompt.is_patched(namespace["clip"])
    assert torch.isfinite(namespace["loss"])


def test_training_engine_block(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the block saves its prompts to my-prompts/
    clip = create_clip("tiny")
    model = fastprompt.build("coop", clip, ["cat", "dog"])
    namespace = _undefined_names()
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])) for _ in range(2)]
    namespace.update(model=model, loader=batches)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    exec(compile(_python_block(3), "README.md[python 2]", "exec"), namespace)
    assert namespace["stats"] is not None
    after = list(model.trainable_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)), "the block trained nothing"
    again = fastprompt.load_prompts("my-prompts", clip)
    assert all(torch.equal(a, b) for a, b in zip(again.trainable_parameters(), after, strict=True))


# --- commands quoted inline ----------------------------------------------------------------------------
_PLACEHOLDERS = {"<dataset>": "eurosat", "DIR": "/data", "...": ""}


def inline_fastprompt_commands() -> list[str]:
    spans = re.findall(r"`(fastprompt [^`]+)`", README)
    return sorted({span for span in spans if not span.startswith(("fastprompt.", "fastprompt/"))})


@pytest.mark.parametrize("command", inline_fastprompt_commands())
def test_inline_commands_parse(command):
    words = [_PLACEHOLDERS.get(w, w) for w in shlex.split(command)[1:]]
    words = [w for w in words if w]
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(words)
    except (SystemExit, Exception) as error:  # the CLI's parser raises its usage errors
        pytest.fail(f"README's `{command}` does not parse: {error!r}")
    if getattr(args, "takes_extra", False) and args.command != "bench":
        assert all("=" in item for item in extra), f"README's `{command}`: stray {extra}"
    else:
        assert extra == [] or args.command == "bench", f"README's `{command}`: unrecognised {extra}"


def test_demo_options_named_in_the_readme_exist():
    section = README.split("### What the demo shows", 1)[1].split("\n## ", 1)[0]
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", " ".join(re.findall(r"`([^`]+)`", section))))
    assert flags, "the demo section names no option"
    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    known = {option for action in demo._actions for option in action.option_strings}
    assert flags <= known, f"the README names demo options that do not exist: {sorted(flags - known)}"


def test_inline_python_modules_and_files_exist():
    import importlib.util

    for module in re.findall(r"`python -m ([\w.]+)", README):
        assert importlib.util.find_spec(module) is not None, module
    for path in re.findall(r"`python (bench/[\w/.]+\.py)", README) + re.findall(r"`bash (bench/[\w/.]+\.sh)", README):
        assert (REPO / path).is_file(), path
