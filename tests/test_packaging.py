"""The wheel `pip install fastprompt` gets: every source file of the checkout, and every module importable from it
alone. pyproject.toml lists the packages by hand (kernels/ is mapped to fastprompt.kernels), and an editable install
(the README's) finds unlisted subpackages through the checkout, so only a built wheel shows a missing one."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources() -> set[str]:
    """The checkout's Python files as the wheel should name them."""
    found = set()
    for folder, installed in (("fastprompt", "fastprompt"), ("kernels", "fastprompt/kernels")):
        for directory, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            relative = os.path.relpath(directory, os.path.join(ROOT, folder))
            for name in files:
                if name.endswith(".py"):
                    found.add(os.path.normpath(os.path.join(installed, relative, name)))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools keeps a build/ folder in the source tree and packs whatever an earlier build
    # left there (a package dropped from the list would still ship), and the checkout stays untouched.
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fastprompt", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(out), str(source)], capture_output=True, text=True, cwd=source, timeout=300)
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("fastprompt-*.whl")
    return path


def test_the_wheel_holds_every_source_file(wheel):
    with zipfile.ZipFile(wheel) as archive:
        packed = {os.path.normpath(n) for n in archive.namelist() if n.endswith(".py")}
    assert _sources() - packed == set(), "pyproject.toml's packages miss these"


def test_every_module_imports_from_the_wheel_alone(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    script = (
        "import importlib, pkgutil, sys\n"
        f"sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
        "import fastprompt\n"
        f"assert fastprompt.__file__.startswith({str(tmp_path / 'site')!r}), fastprompt.__file__\n"
        "names = [m.name for m in pkgutil.walk_packages(fastprompt.__path__, 'fastprompt.')\n"
        "         if not m.name.endswith('__main__')]  # __main__ runs the command line\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip().splitlines()[-1]) >= len(_sources()) - 10  # every module, not a stray few
