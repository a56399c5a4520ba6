"""Creating the frozen CLIP: open_clip names and pretrained tags/files, plus fastprompt's tiny configs.

Pretrained weights load through open_clip's factory: a tag (e.g. 'openai') where the machine can reach the
hub, or a local checkpoint file anywhere. The tiny configs are random-weight models at a fraction of the width,
for tests and the CPU demo: 'tiny' and 'small' have every structural feature of ViT-B/16 (12 layers per tower,
causal text with the real tokenizer and 77-token context); 'tiny-b32', 'tiny-l14' and 'tiny-alt' are shaped
like the other open_clip CLIP families (see TINY_CONFIGS) for the method x backbone matrix.
"""

from __future__ import annotations

import difflib
import os
import pickle
import re
import socket
from urllib.parse import urlparse

import torch

TINY_CONFIGS = {
    # 12 layers per tower so every method's default depth (MaPLe 9, MMRL 6..12) applies unchanged.
    "tiny": dict(
        embed_dim=64,
        vision_cfg=dict(image_size=32, layers=12, width=64, patch_size=8, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=12),
    ),
    "small": dict(
        embed_dim=128,
        vision_cfg=dict(image_size=64, layers=12, width=128, patch_size=16, head_width=64),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=12),
    ),
    # The other open_clip CLIP families at a fraction of the width, for the method x backbone matrix
    # (tests/test_backbone_matrix.py). ViT-B/32: half the patch grid of B/16 (7x7 at 224 -> 2x2 here).
    "tiny-b32": dict(
        embed_dim=64,
        vision_cfg=dict(image_size=32, layers=12, width=64, patch_size=16, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=12),
    ),
    # ViT-L/14: 24 vision layers against 12 text layers, vision wider than text (1024 vs 768), a patch size
    # that is not a power of two (14 -> 7), and an embed_dim equal to neither width, so a width or depth
    # taken from the wrong tower fails.
    "tiny-l14": dict(
        embed_dim=48,
        vision_cfg=dict(image_size=28, layers=24, width=128, patch_size=7, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=96, heads=3, layers=12),
    ),
    # The structural switches of other open_clip CLIP configs in one model: QuickGELU (OpenAI weights, the
    # *-quickgelu configs), vision LayerScale (ViT-M-16-alt), no ln_pre (CLIPA), text pooled at an EOS id
    # ('eos', the worldwide configs; here the CLIP tokenizer's EOT) and a shorter text context.
    "tiny-alt": dict(
        embed_dim=64,
        quick_gelu=True,
        vision_cfg=dict(image_size=32, layers=12, width=64, patch_size=8, head_width=32, ls_init_value=0.1,
                        no_ln_pre=True),
        text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=12, pool_type="eos",
                      eos_id=49407),
    ),
    # RN50's structure (open_clip's ModifiedResNet: four stages of bottlenecks, an attention pool, embed_dim
    # wider than the text): the CNN tower that only the text-prompt methods run on.
    "tiny-rn50": dict(
        embed_dim=96,
        vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=8, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=12),
    ),
}


def known_backbones() -> list[str]:
    import open_clip

    return sorted(set(open_clip.list_models()) | set(TINY_CONFIGS))


def create_clip(
    name: str = "ViT-B-16",
    pretrained: str | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    seed: int | None = 0,
):
    """An open_clip CLIP by name (or a fastprompt tiny config), optionally with pretrained weights.

    `pretrained` is an open_clip tag for `name` or a path to a local checkpoint. Errors name the problem:
    an unknown backbone lists close matches, a missing file says so before open_clip tries a download.
    """
    import open_clip

    if seed is not None:
        torch.manual_seed(seed)
    if name in TINY_CONFIGS:
        if pretrained:
            if not os.path.isfile(pretrained):
                looks_like_a_tag = os.sep not in pretrained and "." not in pretrained
                raise FileNotFoundError(
                    f"backbone {name!r} has no published weights, so pretrained={pretrained!r} must be a weights"
                    " file of it (use pretrained=none for random weights)" if looks_like_a_tag
                    else f"pretrained checkpoint {pretrained!r} not found")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if dtype is None:
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        # cast_dtype selects open_clip's LayerNormFp32 for low precision, as its factory does.
        cast = None if dtype == torch.float32 else dtype
        model = open_clip.CLIP(**TINY_CONFIGS[name], cast_dtype=cast)
        if pretrained:
            _load_weights_file(model, pretrained, name)
        if cast is not None:
            open_clip.model.convert_weights_to_lp(model, dtype=dtype)
        return model.to(device).eval()
    known = known_backbones()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
        raise ValueError(f"unknown backbone {name!r}{hint}")
    if pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"pretrained checkpoint {pretrained!r} not found")
    precision_map = {"fp32": "fp32", "bf16": "pure_bf16", "fp16": "pure_fp16"}
    if precision not in precision_map:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    problem = tag_problem(name, pretrained)
    if problem is not None:
        raise ValueError(problem)
    if pretrained and not os.path.isfile(pretrained):
        _check_weights_reachable(name, pretrained)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, precision=precision_map[precision], device=device,
                                       **tag_model_options(name, pretrained))
    except (RuntimeError, pickle.UnpicklingError, AssertionError, KeyError) as error:  # open_clip asserts shapes too
        if not (pretrained and os.path.isfile(pretrained)):
            raise
        raise WeightsFileError(f"pretrained file {pretrained!r} does not load into {name}: {_first_lines(error)}") from None
    return model.eval()


def tag_model_options(name: str, pretrained: str | None) -> dict:
    """The model options a pretrained tag's weights were trained with that open_clip's factory does not apply by
    itself: QuickGELU. OpenAI's weights (and a few others) were trained with it, the plain configs (ViT-B-16, RN50)
    use nn.GELU, and open_clip builds the plain config and only warns of the mismatch, so ViT-B-16 + 'openai'
    would run OpenAI's weights through the wrong activation; the research code (OpenAI's CLIP) uses QuickGELU.
    The same model as the '-quickgelu' config of the name. A weights file's activation is not known: the name
    decides (ViT-B-16-quickgelu for OpenAI's)."""
    import open_clip

    if not pretrained or os.path.isfile(pretrained):
        return {}
    tag = open_clip.get_pretrained_cfg(name, pretrained) or {}
    if tag.get("quick_gelu") and not (open_clip.get_model_config(name) or {}).get("quick_gelu"):
        return {"force_quick_gelu": True}
    return {}


def tag_problem(name: str, pretrained: str | None) -> str | None:
    """Why fastprompt cannot use the pretrained tag's weights as they were trained (None: it can). Its data pipeline
    normalises every image with OpenAI CLIP's mean and std (fastprompt.data.transforms), which is what nearly every
    tag of the supported CLIPs was trained with; a tag trained on other statistics (ViT-L-14's laion2b_s32b_b82k:
    0.5, 0.5) would see inputs shifted from its training distribution, silently, so it is refused."""
    if not pretrained or os.path.isfile(pretrained) or name in TINY_CONFIGS or _clip_normalised(name, pretrained):
        return None
    import open_clip

    from .data.transforms import CLIP_MEAN, CLIP_STD

    tag = open_clip.get_pretrained_cfg(name, pretrained)
    others = [t for t in open_clip.list_pretrained_tags_by_model(name) if _clip_normalised(name, t)]
    return (f"the {pretrained!r} weights of {name} were trained on images normalised with mean {tuple(tag['mean'])},"
            f" std {tuple(tag['std'])}; fastprompt normalises with OpenAI CLIP's {CLIP_MEAN}, {CLIP_STD}, so these"
            f" weights would see inputs they were not trained on"
            + (f"; use another tag of {name}: {', '.join(others)}" if others else ""))


def _clip_normalised(name: str, tag: str) -> bool:
    """Whether open_clip's table gives `tag` of `name` OpenAI CLIP's normalisation (or none: then it is CLIP's)."""
    import open_clip

    from .data.transforms import CLIP_MEAN, CLIP_STD

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    trained = tuple(cfg.get("mean", CLIP_MEAN)) + tuple(cfg.get("std", CLIP_STD))
    return max(abs(a - b) for a, b in zip(trained, CLIP_MEAN + CLIP_STD)) <= 1e-6


class WeightsFileError(ValueError):
    """A local weights file that is not a checkpoint of the backbone (corrupt, another format or architecture)."""


def _first_lines(error: BaseException, keep: int = 2) -> str:
    """An exception's message cut to its first problems: load_state_dict lists every mismatched tensor (hundreds
    of lines for another architecture)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    rest = f" ... ({len(lines) - keep} more)" if len(lines) > keep else ""
    return " ".join(lines[:keep]) + rest


def _load_weights_file(model, path: str, name: str) -> None:
    try:
        if path.endswith(".safetensors"):
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state = load_file(path)
            except SafetensorError as error:
                raise WeightsFileError(f"pretrained file {path!r} is not a safetensors file ({error})") from None
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except pickle.UnpicklingError as error:  # torch's message is a paragraph on weights_only; one line says why
        text = " ".join(str(error).split())
        found = re.search(r"Unpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text)
        why = found.group(1) if found else text[:200]
        raise WeightsFileError(f"pretrained file {path!r} is not a weights-only torch checkpoint ({why})") from None
    except (RuntimeError, EOFError, OSError, AttributeError) as error:
        raise WeightsFileError(f"pretrained file {path!r} does not load into {name}: {_first_lines(error)}") from None


def cached_weights(name: str, tag: str) -> str | None:
    """The local file open_clip would load for `name` + `tag` without downloading (its hub cache or its URL
    cache), or None when a download would be needed. Unknown tags give None (open_clip names them)."""
    import open_clip
    from open_clip import pretrained as known

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        return None
    if "file" in cfg:
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    repo, filename = _hub_entry(cfg)
    if repo:
        from huggingface_hub import try_to_load_from_cache

        filename = filename or known.HF_WEIGHTS_NAME
        # open_clip tries the safetensors twin first, then the named file.
        for candidate in [*known._get_safe_alternatives(filename), filename]:
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.get("url") and os.path.isfile(_url_cache_file(cfg["url"])):
        return _url_cache_file(cfg["url"])
    return None


def _hub_entry(cfg: dict) -> tuple[str, str]:
    """(repository, file name or '') of a pretrained config's hub entry ('org/name/' or 'org/name/file'), as
    open_clip reads it; ('', '') without one or without huggingface_hub."""
    from open_clip import pretrained as known

    hub = cfg.get("hf_hub", "")
    return os.path.split(hub) if hub and known.has_hf_hub() else ("", "")


def _url_cache_file(url: str) -> str:
    """Where open_clip's URL download keeps `url`'s file."""
    return os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))


def weights_host(name: str, tag: str) -> str | None:
    """The host open_clip would download `name` + `tag` from (the Hugging Face hub when it is installed and the tag
    has a hub entry, else the tag's URL)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if _hub_entry(cfg)[0]:
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    return urlparse(cfg["url"]).hostname if cfg.get("url") else None


def host_reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:443 opens within `timeout` seconds (name lookup included)."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_weights_reachable(name: str, tag: str) -> None:
    """Fail in seconds, naming the way out, when a tag's weights are neither cached nor downloadable: offline, the
    hub client retries for about a minute before it gives up with a traceback."""
    if cached_weights(name, tag) is not None:
        return
    host = weights_host(name, tag)
    if host is None:
        return  # not a known tag: open_clip's own error lists the tags
    hub_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if hub_offline or not host_reachable(host):
        why = "HF_HUB_OFFLINE is set" if hub_offline else f"{host} cannot be reached"
        raise WeightsUnavailableError(
            f"the {tag!r} weights of {name} are not in this machine's cache and {why}: load them once on a "
            f"connected machine and copy open_clip's cache of them here ({weights_cache_path(name, tag)}), or give "
            f"a local file with pretrained=/path/to/weights")


def weights_cache_path(name: str, tag: str) -> str:
    """Where open_clip keeps `name` + `tag` once downloaded: the hub cache's folder of the repository (a compute
    node without internet takes a copy of it from a connected machine), or the file in its URL cache."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    repo, _ = _hub_entry(cfg)
    if repo:
        from huggingface_hub import constants

        return os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"))
    return _url_cache_file(cfg.get("url", ""))


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights that are neither cached nor downloadable from here."""
