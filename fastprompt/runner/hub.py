"""Checkpoints on the Hugging Face Hub: `hf-hub:<org>/<name>[/<folder>][@<revision>]` wherever a checkpoint is
taken (`fastprompt predict`, `eval --checkpoint`, `export`, Predictor, load_prompts), as open_clip names hub models.

A checkpoint is a small folder (checkpoint.safetensors + checkpoint.json, or a run folder of seeds): published with
the hub's own client (`hf upload <org>/<name> runs/maple-b2n-dtd-16shot/seed1`), fetched here with
`huggingface_hub.snapshot_download`, which keeps it in the hub's cache (HF_HOME), finds it there offline
(HF_HUB_OFFLINE=1, or when the hub cannot be reached) and checks nothing else: the checkpoint's own manifest and
tensors are checked as a local one's are. Only the named folder is fetched from a repository that holds several.
"""

from __future__ import annotations

import os

HUB_PREFIX = "hf-hub:"


def is_hub_reference(path) -> bool:
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_reference(reference: str) -> tuple[str, str, str | None]:
    """(repository id, folder inside it or '', revision or None) of `hf-hub:org/name[/folder][@revision]`."""
    from .checkpoint import CheckpointError

    body, at, revision = reference[len(HUB_PREFIX):].partition("@")
    parts = [part for part in body.split("/") if part]
    if len(parts) < 2 or (at and not revision):
        raise CheckpointError(f"{reference} is not a hub checkpoint: write "
                              "hf-hub:<org>/<name>[/<folder>][@<revision>]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def local_checkpoint(reference: str) -> str:
    """The local folder of hub checkpoint `reference`: fetched into the hub's cache, or found there."""
    from huggingface_hub import snapshot_download

    from .checkpoint import CheckpointError

    repo, folder, revision = parse_reference(reference)
    try:
        snapshot = snapshot_download(repo, revision=revision, allow_patterns=f"{folder}/**" if folder else None,
                                     library_name="fastprompt")
    except Exception as error:  # noqa: BLE001 - the hub client's errors differ by version; each becomes one line
        why = " ".join(str(error).split())[:300] or type(error).__name__
        raise CheckpointError(f"{reference}: cannot fetch {repo}"
                              f"{f' (revision {revision})' if revision else ''} from the Hugging Face Hub, nor find"
                              f" it in its cache ({type(error).__name__}: {why})") from None
    path = os.path.join(snapshot, folder) if folder else snapshot
    if not os.path.isdir(path):
        raise CheckpointError(f"{reference}: the repository {repo} has no folder {folder!r}")
    return path
