"""The runner's loader batches as uint8 pixels normalised on the device give exactly the values of eval_transform
(evaluation) and train_transform (training, same draws), and a test split's pixels are kept between the evaluations
of a process (the next seed, eval_every, the next checkpoint) within a memory budget, with the same metrics as
decoding every time."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from fastprompt.data import (eval_pixels_transform, eval_transform, normalise_pixels, procedural_splits,
                             subsample_classes)
from fastprompt.data.procedural import ProceduralLoader
from fastprompt.runner import eval_cache, machine
from fastprompt.runner.config import ConfigError, RunConfig, check_config
from fastprompt.runner.eval_cache import EvalCache, split_key
from runner_support import FAST, PROCEDURAL, read_json


@pytest.mark.parametrize("shape, mode", [((300, 250), "RGB"), ((224, 224), "RGB"), ((90, 170), "L"),
                                         ((41, 37), "RGB"), ((500, 333), "P")])
@pytest.mark.parametrize("size", [224, 32])
def test_pixels_normalised_are_eval_transforms_values(shape, mode, size):
    rng = np.random.default_rng(sum(shape))
    image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).convert(mode)
    pixels = eval_pixels_transform(size)(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, size, size)
    assert torch.equal(normalise_pixels(pixels), eval_transform(size)(image))
    # A batch at once (how the runner normalises) gives each image's values.
    assert torch.equal(normalise_pixels(torch.stack([pixels, pixels]))[1], eval_transform(size)(image))


class CountingLoader:
    """make_loader for EvalCache.batches: a DataLoader over fixed (uint8 pixels, labels), counting its builds."""

    def __init__(self, count=10, size=8, batch=4):
        generator = torch.Generator().manual_seed(count)
        self.pixels = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
        self.labels = torch.randint(0, 5, (count,), generator=generator)
        self.batch, self.builds = batch, 0

    def __call__(self):
        self.builds += 1
        return DataLoader(TensorDataset(self.pixels, self.labels), batch_size=self.batch)


def _pass(cache, key, source, size=8, batch=4):
    return [(images.clone(), labels.clone()) for images, labels in cache.batches(key, source, size, batch,
                                                                                torch.device("cpu"))]


def test_a_kept_split_gives_the_same_batches_without_its_loader():
    source, cache = CountingLoader(), EvalCache(10_000)
    first = _pass(cache, "k", source)
    assert cache.holds("k") and cache.used_bytes == 10 * 3 * 8 * 8 + 10 * 8 and source.builds == 1
    second = _pass(cache, "k", source)
    assert source.builds == 1  # nothing decoded again
    assert [labels.tolist() for _, labels in second] == [labels.tolist() for _, labels in first]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, second))
    # The batches are the loader's pixels normalised, in its order.
    assert torch.equal(torch.cat([images for images, _ in first]), normalise_pixels(source.pixels))


def test_nothing_is_kept_over_budget_or_from_an_interrupted_pass():
    source = CountingLoader()
    small = EvalCache(10 * 3 * 8 * 8 + 10 * 8 - 1)
    _pass(small, "k", source)
    assert not small.holds("k") and small.used_bytes == 0
    cache = EvalCache(10_000)
    batches = cache.batches("k", source, 8, 4, torch.device("cpu"))
    next(batches)
    batches.close()  # the evaluation stopped after one batch
    assert not cache.holds("k")
    _pass(cache, "k", source)
    assert cache.holds("k") and source.builds == 3
    _pass(cache, "other", CountingLoader(count=50))  # 10,000 bytes, more than the 8,000 left
    assert not cache.holds("other") and cache.used_bytes == 10 * 3 * 8 * 8 + 10 * 8


def test_kept_pixels_live_in_chunks_and_any_batch_size_reads_them(monkeypatch):
    """Chunks of whole batches (here 8 images of 192 bytes in a 1,600-byte chunk); read back with another batch
    size, a batch that spans two chunks is joined, and every pass gives the loader's images in its order."""
    monkeypatch.setattr(eval_cache, "_CHUNK_BYTES", 1_600)
    source, cache = CountingLoader(count=19), EvalCache(100_000)
    _pass(cache, "k", source)
    kept = cache._kept["k"]
    assert [chunk.shape[0] for chunk in kept.chunks] == [8, 8, 3]
    expected = normalise_pixels(source.pixels)
    for batch in (3, 4, 19, 50):
        images = torch.cat([images for images, _ in _pass(cache, "k", source, batch=batch)])
        assert torch.equal(images, expected), batch
    assert source.builds == 1


def test_pinned_memory_is_counted_as_the_allocator_rounds_it():
    # PyTorch's pinned-memory allocator rounds each allocation up to a power of two.
    assert [eval_cache._pinned_size(n) for n in (1, 1920, 2048, 2049, 1 << 28)] == [1, 2048, 2048, 4096, 1 << 28]


def test_budget_follows_the_setting_and_the_memory(monkeypatch):
    monkeypatch.setattr(machine, "available_memory", lambda: 12_000)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpu = torch.device("cpu")
    assert EvalCache.for_process("auto", 1, cpu).budget_bytes == 0  # one evaluation: nothing to gain
    assert EvalCache.for_process("auto", 3, cpu).budget_bytes == 6_000
    assert EvalCache.for_process(True, 1, cpu).budget_bytes == 9_000
    assert EvalCache.for_process(False, 3, cpu).budget_bytes == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun's processes on this node share the memory
    assert EvalCache.for_process("auto", 3, cpu).budget_bytes == 2_000
    monkeypatch.setattr(machine, "available_memory", lambda: None)
    assert EvalCache.for_process(True, 3, cpu).budget_bytes == 0


def test_available_memory_is_read_on_linux():
    available = machine.available_memory()
    assert available is None or 0 < available < 1 << 50


def test_split_keys_tell_splits_apart():
    splits = procedural_splits(num_train_per_class=1, num_test_per_class=2, image_size=32, num_classes=4)
    again = procedural_splits(num_train_per_class=1, num_test_per_class=2, image_size=32, num_classes=4)
    assert split_key(splits, 32) == split_key(again, 32)  # loaded again: equal loaders, equal pixels
    assert split_key(splits, 32) != split_key(splits, 48)
    assert split_key(splits, 32) != split_key(subsample_classes(splits, "base"), 32)
    other_seed = procedural_splits(num_train_per_class=1, num_test_per_class=2, image_size=32, num_classes=4, seed=5)
    assert split_key(splits, 32) != split_key(other_seed, 32)
    assert ProceduralLoader(1, 32) == ProceduralLoader(1, 32) != ProceduralLoader(2, 32)


def test_eval_cache_option_is_checked():
    config = RunConfig(eval_cache="off")
    check_config(config)
    assert config.eval_cache is False
    with pytest.raises(ConfigError, match="eval_cache must be true, false or auto, got 'sometimes'"):
        check_config(RunConfig(eval_cache="sometimes"))


def _decodes(monkeypatch) -> list:
    """Every procedural image rendered, by split."""
    rendered = []
    real = ProceduralLoader.__call__

    def counted(self, key):
        rendered.append(key.split("/")[0])
        return real(self, key)

    monkeypatch.setattr(ProceduralLoader, "__call__", counted)
    return rendered


@pytest.mark.parametrize("setting", ["auto", "false"])
def test_a_two_seed_run_decodes_its_test_split_once(tmp_path, cli, monkeypatch, setting):
    """Seeds 1 and 2 of a base-to-novel run: with the cache, the second seed's evaluations read the kept pixels
    (said in the log) and the test images are rendered once; the metrics are those of decoding every time."""
    rendered = _decodes(monkeypatch)
    run = tmp_path / setting
    code, out, err = cli("train", "--method", "coop", *PROCEDURAL, "--shots", 2, "--seeds", "1,2", *FAST,
                         "epochs=2", "batch_size=4", "n_ctx=4", f"eval_cache={setting}", f"output_dir={run}")
    assert code == 0, err
    tests = sum(1 for split in rendered if split == "test")
    per_pass = read_json(run / "seed1" / "results.json")["targets"]
    images = sum(target["images"] for target in per_pass)
    if setting == "auto":
        assert tests == images and out.count("pixels kept from an earlier pass") == 2
    else:
        assert tests == 2 * images and "pixels kept" not in out


def test_kept_pixels_give_the_metrics_of_decoding_every_time(tmp_path, cli, monkeypatch):
    results = {}
    for setting in ("auto", "false"):
        run = tmp_path / setting
        code, out, err = cli("train", "--method", "coop", *PROCEDURAL, "--shots", 2, "--seeds", "1,2", *FAST,
                             "epochs=2", "batch_size=4", "n_ctx=4", f"eval_cache={setting}", f"output_dir={run}")
        assert code == 0, err
        results[setting] = [read_json(run / f"seed{s}" / "results.json")["targets"] for s in (1, 2)]
    assert results["auto"] == results["false"]


def test_eval_of_several_checkpoints_shares_the_kept_pixels(tmp_path, cli, monkeypatch):
    run = tmp_path / "run"
    code, _, err = cli("train", "--method", "coop", *PROCEDURAL, "--shots", 2, "--seeds", "1,2", *FAST, "epochs=2",
                       "batch_size=4", "n_ctx=4", f"output_dir={run}")
    assert code == 0, err
    rendered = _decodes(monkeypatch)
    code, out, err = cli("eval", run)
    assert code == 0, err
    assert out.count("pixels kept from an earlier pass") == 2  # seed 2's base and novel targets
    images = sum(target["images"] for target in read_json(run / "seed1" / "results.json")["targets"])
    assert sum(1 for split in rendered if split == "test") == images  # seed 1's pass only


def test_kept_batches_copy_only_their_pixels_and_labels_to_the_device():
    """After the first batch, a pass over kept pixels moves each batch's pixels and labels to the device and nothing
    else from the host (the normalisation's constants went once): "meta" stands in for the GPU."""
    from test_device_data import HostToDevice

    source, cache = CountingLoader(count=12), EvalCache(10_000)
    list(cache.batches("k", source, 8, 4, torch.device("meta")))
    with HostToDevice() as watch:
        batches = list(cache.batches("k", source, 8, 4, torch.device("meta")))
    assert len(batches) == 3 and watch.calls == ["to", "to"] * 3, watch.calls


@pytest.mark.gpu
def test_evaluation_batches_on_a_gpu_do_not_synchronise():
    source, cache = CountingLoader(count=12), EvalCache(10_000, pin_memory=True)
    device = torch.device("cuda")
    first = [images.clone() for images, _ in cache.batches("k", source, 8, 4, device)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        kept = [images for images, _ in cache.batches("k", source, 8, 4, device)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(first, kept))


def test_evaluation_loaders_take_the_cores_training_leaves(monkeypatch):
    from fastprompt.runner import data

    monkeypatch.setattr(data.platform, "system", lambda: "Linux")
    monkeypatch.setattr(data, "usable_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = RunConfig()
    assert (data.worker_count(auto, cuda), data.worker_count(auto, cuda, evaluation=True)) == (8, 15)
    assert data.worker_count(auto, cpu, evaluation=True) == 0  # the model's ops need the cores
    assert data.worker_count(RunConfig(num_workers=3), cuda, evaluation=True) == 3  # asked for: as asked
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's four processes on this node share its 16 cores
    assert (data.worker_count(auto, cuda), data.worker_count(auto, cuda, evaluation=True)) == (4, 3)
    monkeypatch.setattr(data, "usable_cpus", lambda: 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert data.worker_count(auto, cuda, evaluation=True) == 1


def test_training_pixels_normalised_are_train_transforms_values():
    """The training loader's uint8 crops, normalised on the device, are train_transform's values with the same seed
    (the same random draws: the crop box and the flip)."""
    from fastprompt.data import train_pixels_transform, train_transform

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    for seed in range(6):
        torch.manual_seed(seed)
        expected = train_transform(32, scale=(0.3, 1.0))(image)
        after = torch.rand(1)
        torch.manual_seed(seed)
        pixels = train_pixels_transform(32, scale=(0.3, 1.0))(image)
        assert pixels.dtype == torch.uint8 and torch.equal(normalise_pixels(pixels), expected)
        assert torch.equal(torch.rand(1), after)


def test_memory_that_cannot_be_pinned_is_said_and_evaluation_goes_on(monkeypatch):
    real_empty = torch.empty

    def refuse_pinning(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("cudaHostAlloc failed: out of memory\nmore detail")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(eval_cache.torch, "empty", refuse_pinning)
    source, cache = CountingLoader(), EvalCache(10_000, pin_memory=True)
    batches = _pass(cache, "k", source)
    assert len(batches) == 3 and not cache.holds("k") and cache.used_bytes == 0
    assert cache.notes == ["eval_cache: could not pin 0.00 GiB for this test split (cudaHostAlloc failed: out of"
                           " memory); it is decoded again at every evaluation"]


def test_the_run_log_says_what_the_cache_could_not_keep(tmp_path, cli, monkeypatch):
    def refused(self, count, size, batch_size):
        self.notes.append("eval_cache: could not pin (a stand-in refusal)")
        return None, 0

    monkeypatch.setattr(EvalCache, "_allocate", refused)
    code, out, err = cli("train", "--method", "coop", *PROCEDURAL, "--shots", 2, "--seeds", "1,2", *FAST, "epochs=2",
                         "batch_size=4", "n_ctx=4", f"output_dir={tmp_path / 'run'}")
    assert code == 0, err
    assert out.count("note: eval_cache: could not pin (a stand-in refusal)") == 4  # 2 seeds x base and novel
    assert "pixels kept" not in out
