"""Pretrained weights that are neither cached nor reachable fail in seconds with one line naming the way out
(pretrained=/path), before open_clip's hub client would retry for a minute. No test here opens a connection: the
reachability probe and the cache lookup are replaced, or the hub is flagged offline."""

import os
import time

import open_clip
import pytest

from fastprompt import backbones
from runner_support import PROCEDURAL


@pytest.fixture
def no_network(monkeypatch):
    probes = []

    def unreachable(host, timeout=3.0):
        probes.append(host)
        return False

    monkeypatch.setattr(backbones, "host_reachable", unreachable)
    monkeypatch.setattr(backbones, "cached_weights", lambda name, tag: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def must_not_download(*args, **kwargs):
        raise AssertionError("open_clip.create_model was called: it would try the download")

    monkeypatch.setattr(open_clip, "create_model", must_not_download)
    return probes


def test_uncached_unreachable_weights_fail_fast(no_network):
    start = time.perf_counter()
    with pytest.raises(backbones.WeightsUnavailableError, match="huggingface.co cannot be reached.*pretrained=/path"
                       ) as error:
        backbones.create_clip("ViT-B-16", pretrained="openai")
    assert "copy open_clip's cache of them here (" in str(error.value)
    assert "models--timm--vit_base_patch16_clip_224.openai)" in str(error.value)
    assert time.perf_counter() - start < 5 and no_network == ["huggingface.co"]


def test_hub_offline_flag_is_named_without_a_probe(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(backbones.WeightsUnavailableError, match="HF_HUB_OFFLINE is set"):
        backbones.create_clip("ViT-B-16", pretrained="openai")
    assert no_network == []


def test_cached_weights_go_to_open_clip_without_a_probe(monkeypatch, tmp_path):
    probes, created = [], []
    monkeypatch.setattr(backbones, "host_reachable", lambda host, timeout=3.0: probes.append(host) or False)
    monkeypatch.setattr(backbones, "cached_weights", lambda name, tag: str(tmp_path / "weights.safetensors"))

    class Built:
        def eval(self):
            return self

    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: created.append((a, k)) or Built())
    assert isinstance(backbones.create_clip("ViT-B-16", pretrained="openai"), Built)
    assert probes == [] and created[0][1]["pretrained"] == "openai"  # the tag: open_clip keeps its settings


def test_cached_weights_finds_the_hub_and_url_caches(monkeypatch, tmp_path):
    """The lookup itself, against a hub cache and a URL cache laid out as the downloaders leave them."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert backbones.cached_weights("ViT-B-16", "openai") is None
    # Hub layout: models--<org>--<name>/snapshots/<revision>/<file>, refs/main naming the revision.
    repo = tmp_path / "hub" / "models--timm--vit_base_patch16_clip_224.openai"
    assert backbones.weights_cache_path("ViT-B-16", "openai") == str(repo)  # what the offline error says to copy
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    weights = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"x")
    assert backbones.cached_weights("ViT-B-16", "openai") == str(weights)
    # A URL-only tag (no hub entry) is looked up in open_clip's URL cache, ~/.cache/clip/<file name>.
    cfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: {"url": cfg["url"]})
    assert backbones.cached_weights("ViT-B-16", "openai") is None
    target = tmp_path / "home" / ".cache" / "clip" / os.path.basename(cfg["url"])
    assert backbones.weights_cache_path("ViT-B-16", "openai") == str(target)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    assert backbones.cached_weights("ViT-B-16", "openai") == str(target)
    assert backbones.weights_host("ViT-B-16", "openai") == "openaipublic.azureedge.net"


def test_cli_offline_train_is_one_line_and_no_folder(no_network, tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli("train", "--method", "coop", *PROCEDURAL, "--shots", "2", "batch_size=4", "backbone=ViT-B-16",
                       "pretrained=openai", "device=cpu", "num_workers=0", f"output_dir={out}")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("fastprompt: error: backbone='ViT-B-16', pretrained='openai': the 'openai' weights")
    assert "pretrained=/path" in err and not os.path.exists(out)
