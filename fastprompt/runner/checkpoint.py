"""Checkpoints, resumable training states and run manifests: safetensors + JSON, written atomically.

A checkpoint is a pair in one folder:
    checkpoint.safetensors  the method's state_dict (every trainable parameter; nothing of the frozen CLIP)
    checkpoint.json         format, method, options, backbone (name, pretrained, shape facts), class names,
                            the run config, versions, git commit, and the sha256 of the tensor file.
The tensor file is written first, the manifest last; the manifest's hash ties the two, so a crash between
the writes, a truncated file or a manifest from another checkpoint is detected on load, never loaded.

A training state (for `--resume`) is the same kind of pair holding the weights, the optimizer state, the RNG
states (torch, CUDA, Python, NumPy, the loader's generator), the GPA sums and the epoch. It is rewritten every
epoch, so its two files are never overwritten in place: the pair is written and verified in a fresh sibling
folder `.state-new`, and one rename of that folder to `state` publishes it (the previous state waits as
`.state-old` meanwhile). A crash at any point leaves either the old or the new state complete; leftovers are
ignored on load and removed by the next save.

No pickle is ever read: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .machine import usable_cpus

CHECKPOINT_FORMAT = "fastprompt.checkpoint/1"
STATE_FORMAT = "fastprompt.train-state/1"
TENSORS, MANIFEST = "checkpoint.safetensors", "checkpoint.json"
STATE_TENSORS, STATE_MANIFEST = "state.safetensors", "state.json"


class CheckpointError(ValueError):
    """A checkpoint or training state is missing, corrupt, or does not fit the model; the message says which."""


# --- atomic files --------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    fsync_folder(folder)


def fsync_folder(folder: str) -> None:
    """Make a rename inside `folder` durable: without it a power cut can undo the rename after the data landed."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms that cannot open a folder (Windows) make renames durable themselves
    try:
        os.fsync(handle)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic there
    finally:
        os.close(handle)


def atomic_write_json(path: str, content) -> None:
    atomic_write_bytes(path, (json.dumps(content, indent=1, sort_keys=False) + "\n").encode())


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{what} {path} is not valid JSON ({error}); the file is corrupt or truncated") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{what} {path} does not hold a JSON object")
    return content


# --- environment ---------------------------------------------------------------------------------------
def git_commit() -> str | None:
    """The commit of the fastprompt source tree, when it is a git checkout (else None)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict:
    import open_clip

    import fastprompt

    return {
        "fastprompt": fastprompt.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def environment(device: torch.device | None = None) -> dict:
    env = {
        "versions": versions(),
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "argv": list(sys.argv),
    }
    if device is not None and device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu"
    return env


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- tensor files --------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _deduplicate(tensors: dict) -> tuple[dict, dict]:
    """(unique tensors, {alias: stored name}): a state_dict lists a shared parameter under every module that
    holds it (MaPLe's vision sources wrap its text prompts); safetensors stores each storage once."""
    unique, aliases, seen = {}, {}, {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and identity in seen:
            aliases[name] = seen[identity]
            continue
        seen[identity] = name
        unique[name] = tensor.to("cpu").contiguous()
    return unique, aliases


def _write_pair(folder: str, tensor_name: str, manifest_name: str, tensors: dict, manifest: dict) -> None:
    unique, aliases = _deduplicate(tensors)
    data = save_safetensors_bytes(unique)
    manifest = {**manifest, "tensor_file": tensor_name, "sha256": _sha256(data), "aliases": aliases,
                "tensors": {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in unique.items()}}
    atomic_write_bytes(os.path.join(folder, tensor_name), data)
    atomic_write_json(os.path.join(folder, manifest_name), manifest)


def _read_pair(folder: str, tensor_name: str, manifest_name: str, what: str, fmt: str) -> tuple[dict, dict]:
    manifest = read_json(os.path.join(folder, manifest_name), f"{what} manifest")
    if manifest.get("format") != fmt:
        raise CheckpointError(
            f"{os.path.join(folder, manifest_name)} is not a {fmt} manifest (format={manifest.get('format')!r})"
        )
    path = os.path.join(folder, manifest.get("tensor_file", tensor_name))
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} tensor file not found: {path} (its manifest is {manifest_name})")
    with open(path, "rb") as handle:
        data = handle.read()
    if _sha256(data) != manifest.get("sha256"):
        raise CheckpointError(
            f"{path} does not match its manifest (sha256 differs): the file is corrupt, truncated or from another"
            " checkpoint"
        )
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    for alias, stored in manifest.get("aliases", {}).items():
        if stored not in tensors:
            raise CheckpointError(f"{path}: alias {alias!r} names {stored!r}, which the file does not hold")
        tensors[alias] = tensors[stored]
    return manifest, tensors


# --- checkpoints ---------------------------------------------------------------------------------------
def backbone_info(model) -> dict:
    """The backbone's shape facts as JSON gives them back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(dataclasses.asdict(model.info)))


def backbone_record(model, name: str, pretrained: str | None) -> dict:
    return {"name": name, "pretrained": pretrained, "info": backbone_info(model)}


def save_checkpoint(folder: str, model, method: str, options: dict, backbone: dict, config: dict | None = None,
                    extra: dict | None = None) -> None:
    """Write checkpoint.safetensors + checkpoint.json for `model` (a PromptedCLIP) into `folder`."""
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "method": method,
        "options": options,
        "backbone": backbone,
        "classnames": list(model.classnames),
        "config": config,
        "versions": versions(),
        "git_commit": git_commit(),
        "created": now(),
        **(extra or {}),
    }
    _write_pair(folder, TENSORS, MANIFEST, model.method.state_dict(), manifest)


def save_prompts(model, folder: str, backbone: str, pretrained: str | None = None) -> str:
    """Save the prompts of a PromptedCLIP trained in one's own loop as a fastprompt checkpoint, the runner's format
    (checkpoint.safetensors + checkpoint.json in `folder`, written atomically): `fastprompt predict`, `eval
    --checkpoint`, `export`, `Predictor` and `load_prompts` read it. `backbone` and `pretrained` are the open_clip
    model name and weights (tag or file) of the CLIP the model was built on, so that those tools can rebuild it;
    its architecture is recorded as well and checked wherever the prompts are loaded. Only the method's trainable
    state is written (kilobytes to a few MB), never the CLIP. Returns the folder."""
    import fastprompt

    built_with = getattr(model, "build_options", None)
    if built_with is None or not hasattr(model, "method"):
        raise TypeError(f"save_prompts takes a model made by fastprompt.build, not {type(model).__name__}")
    name = model.method.name
    # Every option, defaults included, as the runner records them: a later default must not change what this
    # checkpoint means when it is rebuilt.
    options = {**fastprompt.method_options(name), **built_with}
    save_checkpoint(folder, model, name, options, backbone_record(model, backbone, pretrained),
                    extra={"saved_by": "fastprompt.save_prompts"})
    return os.path.abspath(folder)


def load_prompts(path: str, clip, classnames=None):
    """A PromptedCLIP over `clip` holding a checkpoint's prompts (save_prompts' or a run's seed folder): the method
    and options from its manifest, its training classes or `classnames`. The checkpoint's backbone architecture
    must be `clip`'s (an error names what differs); `clip` is frozen as fastprompt.build freezes it."""
    import fastprompt

    manifest, tensors = load_checkpoint(path)
    model = fastprompt.build(manifest["method"], clip, list(manifest["classnames"]), **manifest["options"])
    load_into(model, manifest, tensors)
    if classnames is not None:
        model.set_classnames(classnames)  # refused for class-specific context (CoOp class_specific) on other classes
    return model


def checkpoint_folder(path: str) -> str:
    """The folder of a checkpoint given as the folder, its .safetensors or its .json, or as hf-hub:org/name."""
    from .hub import is_hub_reference, local_checkpoint

    if is_hub_reference(path):
        path = local_checkpoint(path)
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        return path
    if os.path.basename(path) in (TENSORS, MANIFEST):
        return os.path.dirname(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"{path} is not a checkpoint folder, {TENSORS} or {MANIFEST}")


def load_checkpoint(path: str) -> tuple[dict, dict]:
    """(manifest, tensors) of a checkpoint; corrupt, truncated or mismatched files raise CheckpointError."""
    folder = checkpoint_folder(path)
    manifest, tensors = _read_pair(folder, TENSORS, MANIFEST, "checkpoint", CHECKPOINT_FORMAT)
    for key in ("method", "options", "backbone", "classnames"):
        if key not in manifest:
            raise CheckpointError(f"{os.path.join(folder, MANIFEST)} has no {key!r} entry")
    return manifest, tensors


# BackboneInfo fields added after checkpoints were first written, with the value every earlier checkpoint had.
_LATER_INFO_FIELDS = {"vision_tower": "transformer"}


def _only_gelu_differs(saved: dict, current: dict) -> bool:
    """Whether two backbone infos differ in their towers' activation kind and nothing else."""
    def without_gelu(info):
        return {k: ({**v, "gelu": None} if isinstance(v, dict) else v) for k, v in info.items()}

    return saved != current and without_gelu(saved) == without_gelu(current)


def check_compatible(manifest: dict, method: str, backbone_info: dict, backbone_name: str | None = None) -> None:
    """The checkpoint must come from the same method and the same backbone architecture."""
    if manifest["method"] != method:
        raise CheckpointError(
            f"checkpoint holds {manifest['method']!r} prompts; they cannot be loaded into method {method!r}"
        )
    saved = manifest["backbone"]
    saved_info = {**_LATER_INFO_FIELDS, **saved.get("info", {})}
    if saved_info != backbone_info:
        if _only_gelu_differs(saved_info, backbone_info):
            raise CheckpointError(
                f"checkpoint was trained on backbone {saved.get('name')!r} (pretrained={saved.get('pretrained')!r})"
                f" built with {saved_info['text']['gelu']} blocks, and this model has {backbone_info['text']['gelu']}:"
                " its prompts were learned through another activation (fastprompt now builds each pretrained tag with"
                " the activation its weights were trained with, QuickGELU for OpenAI's, where open_clip's plain"
                " config has GELU); train them again")
        differ = sorted(k for k in backbone_info if saved_info.get(k) != backbone_info[k])
        raise CheckpointError(
            f"checkpoint was trained on backbone {saved.get('name')!r}, whose architecture differs from this model's"
            f" ({backbone_name or 'given model'}) in: {', '.join(differ)}"
        )
    if backbone_name is not None and saved.get("name") != backbone_name:
        raise CheckpointError(
            f"checkpoint was trained on backbone {saved.get('name')!r}, not {backbone_name!r}"
        )


def takes_class_set(manifest: dict, classnames) -> bool:
    """Whether the checkpoint's prompts can score `classnames`: any class set, except class-specific context (CoOp
    class_specific=True), which holds one context per training class and needs exactly those classes."""
    return not manifest["options"].get("class_specific") or list(classnames) == list(manifest["classnames"])


def load_into(model, manifest: dict, tensors: dict) -> None:
    """Load the checkpoint tensors into `model.method`, after the method and backbone checks.

    A different class set is fine for parameters that do not depend on the class count (CoOp's generic
    context, every deep prompt); class-specific parameters (CoOp class_specific=True) need the same classes.
    """
    check_compatible(manifest, model.method.name, backbone_info(model))
    if not takes_class_set(manifest, model.classnames):
        raise CheckpointError(
            f"checkpoint has class-specific context for its {len(manifest['classnames'])} training classes; it"
            f" cannot be used with a different class set ({len(model.classnames)} classes given)"
        )
    own = model.method.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint tensors do not match method {manifest['method']!r} built with options {manifest['options']}:"
            f" missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    wrong = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if tuple(own[k].shape) != tuple(tensors[k].shape)]
    if wrong:
        raise CheckpointError("checkpoint tensor shapes do not fit the model: " + "; ".join(wrong[:5]))
    model.method.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


# --- training states -----------------------------------------------------------------------------------
def _flatten_optimizer(state: dict, tensors: dict) -> dict:
    """Optimizer state_dict -> JSON-able structure; tensors go to `tensors` under 'optim.<id>.<name>'."""
    per_param = {}
    for index, values in state["state"].items():
        entry = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                key = f"optim.{index}.{name}"
                tensors[key] = value
                entry[name] = {"tensor": key}
            else:
                entry[name] = {"value": value}
        per_param[str(index)] = entry
    # A fused optimizer's learning rate is a device tensor (fastprompt.training): stored as its value; the engine
    # puts it back on the device when it steps again.
    groups = [{k: float(v) if torch.is_tensor(v) else v for k, v in group.items()} for group in state["param_groups"]]
    return {"state": per_param, "param_groups": groups}


def _unflatten_optimizer(record: dict, tensors: dict, device) -> dict:
    state = {}
    for index, entry in record["state"].items():
        values = {}
        for name, item in entry.items():
            values[name] = tensors[item["tensor"]].to(device) if "tensor" in item else item["value"]
        state[int(index)] = values
    groups = []
    for group in record["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_snapshot(tensors: dict, generator: torch.Generator, device: torch.device) -> dict:
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.loader"] = generator.get_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }


def rng_restore(record: dict, tensors: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.loader"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    version, internal, gauss = record["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = record["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def _state_siblings(folder: str) -> tuple[str, str]:
    """(.state-new, .state-old) next to the state folder `folder`: the unpublished and the replaced state."""
    parent, name = os.path.split(os.path.abspath(folder))
    return os.path.join(parent, f".{name}-new"), os.path.join(parent, f".{name}-old")


def find_state(folder: str) -> str | None:
    """The folder holding the last published training state: `folder` itself, or its previous version when a
    crash came between moving it aside and publishing the next one; None when no state was ever published.
    An unpublished `.state-new` is never used (it may be incomplete)."""
    new, old = _state_siblings(folder)
    if os.path.isdir(folder):
        return folder
    if os.path.isdir(old):
        return old
    return None


def remove_state(folder: str) -> None:
    """Remove a training state with its leftovers (the seed is complete; nothing resumes from it any more)."""
    for path in (folder, *_state_siblings(folder)):
        shutil.rmtree(path, ignore_errors=True)


def save_state(folder: str, epoch: int, model, optimizer, generator, device, gpa=None, history=None,
               config: dict | None = None) -> None:
    """Everything needed to continue after `epoch` exactly as an uninterrupted run would.

    Written into `.state-new` (emptied first: a leftover is from a crash), read back and checked, then
    published by renaming it to `folder`; the state it replaces is moved to `.state-old` first and removed last,
    so a crash between any two steps leaves a complete state that find_state() returns."""
    tensors = {f"model.{k}": v for k, v in model.method.state_dict().items()}
    optim = _flatten_optimizer(optimizer.state_dict(), tensors) if optimizer is not None else None
    rng = rng_snapshot(tensors, generator, device)
    if gpa is not None:
        tensors.update({f"gpa.{k}": v for k, v in gpa.sums.items()})
    manifest = {"format": STATE_FORMAT, "epoch": epoch, "optimizer": optim, "rng": rng,
                "history": history or [], "config": config, "created": now()}
    folder = os.path.abspath(folder)
    new, old = _state_siblings(folder)
    shutil.rmtree(new, ignore_errors=True)
    _write_pair(new, STATE_TENSORS, STATE_MANIFEST, tensors, manifest)
    # Read back what the disk holds before it replaces anything: a short write or a full disk fails here.
    _read_pair(new, STATE_TENSORS, STATE_MANIFEST, "new training state", STATE_FORMAT)
    if os.path.isdir(folder):
        # An .state-old still here is from a crash after the last publish, so `folder` is newer: drop it.
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(new, folder)  # the publish
    fsync_folder(os.path.dirname(folder))
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder: str) -> tuple[dict, dict]:
    """(manifest, tensors) of the last published state at `folder` (see find_state); CheckpointError if none."""
    found = find_state(folder)
    if found is None:
        raise CheckpointError(f"training state not found: {folder}")
    return _read_pair(found, STATE_TENSORS, STATE_MANIFEST, "training state", STATE_FORMAT)


def restore_state(manifest: dict, tensors: dict, model, optimizer, generator, device, gpa=None) -> int:
    """Put a saved state back; returns the epoch it was saved after."""
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    own = model.method.state_dict()
    if set(weights) != set(own) or any(tuple(weights[k].shape) != tuple(own[k].shape) for k in own):
        raise CheckpointError("training state does not fit the model (another method or option set?)")
    model.method.load_state_dict(weights)
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(manifest["optimizer"], tensors, device))
    if gpa is not None:
        for k in gpa.sums:
            gpa.sums[k].copy_(tensors[f"gpa.{k}"])
    rng_restore(manifest["rng"], tensors, generator, device)
    return int(manifest["epoch"])
