"""Few-shot sampling (Dassl's rule, cached as JSON), base/novel split, protocol pairings."""

import json
import math
import os
import random
from collections import defaultdict

import pytest

from fastprompt.data import (
    DatasetError,
    DatasetSplits,
    Sample,
    build_dataset,
    protocol_plan,
    sample_few_shot,
    subsample_classes,
)


def _dassl_reference(train, val, shots, seed):
    """Dassl as written: global random seeded, then generate_fewshot_dataset(train), then val with min(K, 4)."""

    def generate(data_source, num_shots):
        tracker = defaultdict(list)
        for item in data_source:
            tracker[item.label].append(item)
        dataset = []
        for _, items in tracker.items():
            if len(items) >= num_shots:
                sampled_items = random.sample(items, num_shots)
            else:
                sampled_items = items
            dataset.extend(sampled_items)
        return dataset

    state = random.getstate()
    try:
        random.seed(seed)
        return generate(train, shots), generate(val, min(shots, 4))
    finally:
        random.setstate(state)


def _toy_splits(counts, fewshot_dir=None, prefix="/data/toy"):
    """Labels interleaved (not grouped) so that 'order of first appearance' matters; class sizes differ."""
    train, val = [], []
    rows = [(label, k) for k in range(max(counts)) for label in (2, 0, 1) if k < counts[label]]
    for label, k in rows:
        train.append(Sample(f"{prefix}/c{label}/train_{k}.jpg", label, f"class_{label}"))
        val.append(Sample(f"{prefix}/c{label}/val_{k}.jpg", label, f"class_{label}"))
    return DatasetSplits(
        name="toy",
        classnames=("class 0", "class 1", "class 2"),
        train=tuple(train),
        val=tuple(val),
        test=tuple(train),
        fewshot_dir=fewshot_dir,
        path_prefix=prefix,
    )


@pytest.mark.parametrize("shots, seed", [(1, 1), (2, 2), (4, 3), (5, 1), (16, 2)])
def test_sampling_matches_an_independent_dassl_reimplementation(shots, seed):
    splits = _toy_splits(counts=(9, 3, 6))  # class 1 has fewer than K for K >= 4: all of it, no draw
    expected_train, expected_val = _dassl_reference(list(splits.train), list(splits.val), shots, seed)
    sampled = sample_few_shot(splits, shots, seed)
    assert list(sampled.train) == expected_train
    assert list(sampled.val) == expected_val
    assert sampled.test == splits.test and sampled.fewshot == (shots, seed)
    per_class = defaultdict(int)
    for s in sampled.train:
        per_class[s.label] += 1
    assert dict(per_class) == {label: min(shots, n) for label, n in enumerate((9, 3, 6))}


def test_sampling_is_cached_as_json_and_identical_across_runs(fake_caltech):
    root, _ = fake_caltech
    first = sample_few_shot(build_dataset("caltech101", root), shots=2, seed=1)
    cache = root / "caltech-101/split_fewshot/shot_2-seed_1.json"
    content = json.loads(cache.read_text())
    assert content["format"] == "fastprompt.fewshot/1" and (content["shots"], content["seed"]) == (2, 1)
    # Entries are [path relative to the image folder, label, classname], like the CoOp split files.
    assert content["train"][0][0] == os.path.relpath(first.train[0].path, root / "caltech-101/101_ObjectCategories")
    bytes_first = cache.read_bytes()

    cache.unlink()
    second = sample_few_shot(build_dataset("caltech101", root), shots=2, seed=1)
    assert cache.read_bytes() == bytes_first  # a fresh draw writes the same file
    reloaded = sample_few_shot(build_dataset("caltech101", root), shots=2, seed=1)  # from the cache
    assert first.train == second.train == reloaded.train and first.val == reloaded.val
    assert len(first.train) == 8 and len(first.val) == 4  # 4 classes x 2 shots; val has 1 per class

    other_seed = sample_few_shot(build_dataset("caltech101", root), shots=2, seed=2)
    assert other_seed.train != first.train


def test_cache_made_from_another_split_is_refused(fake_caltech):
    root, split = fake_caltech
    sample_few_shot(build_dataset("caltech101", root), shots=1, seed=1)
    cache = root / "caltech-101/split_fewshot/shot_1-seed_1.json"
    content = json.loads(cache.read_text())
    content["train"][0][0] = "accordion/not_in_the_split.jpg"
    cache.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="not in the current train split.*Delete it"):
        sample_few_shot(build_dataset("caltech101", root), shots=1, seed=1)


def test_unwritable_cache_folder_still_samples(tmp_path):
    blocker = tmp_path / "file_not_folder"
    blocker.write_text("")
    splits = _toy_splits((5, 5, 5), fewshot_dir=str(blocker / "split_fewshot"))
    sampled = sample_few_shot(splits, 2, 1)
    assert len(sampled.train) == 6


def test_base_novel_split_reindexes_labels_after_sampling():
    labels = list(range(5))
    samples = tuple(Sample(f"/x/{label}_{k}.jpg", label, f"n{label}") for k in range(3) for label in labels)
    splits = DatasetSplits("five", tuple(f"n{label}" for label in labels), samples, samples[:5], samples)
    few = sample_few_shot(splits, 2, 1)
    base, novel = subsample_classes(few, "base"), subsample_classes(few, "new")
    assert math.ceil(5 / 2) == 3
    assert base.classnames == ("n0", "n1", "n2") and novel.classnames == ("n3", "n4")
    assert base.subset == "base" and novel.subset == "novel"
    # Same images as the all-class sample restricted to the subset, labels re-indexed from 0.
    assert [(s.path, s.label) for s in base.train] == [(s.path, s.label) for s in few.train if s.label < 3]
    assert [(s.path, s.label) for s in novel.test] == [(s.path, s.label - 3) for s in few.test if s.label >= 3]
    assert {s.classname for s in novel.test} == {"n3", "n4"}
    assert subsample_classes(few, "all") is few


def test_sampling_a_subset_or_resampling_is_refused():
    splits = _toy_splits((4, 4, 4))
    with pytest.raises(DatasetError, match="before the base/novel split"):
        sample_few_shot(subsample_classes(splits, "base"), 2, 1)
    with pytest.raises(DatasetError, match="already a 2-shot sample"):
        sample_few_shot(sample_few_shot(splits, 2, 1), 2, 1)
    with pytest.raises(DatasetError, match="shots must be a positive integer"):
        sample_few_shot(splits, 0, 1)
    with pytest.raises(DatasetError, match="subset must be"):
        subsample_classes(splits, "half")


def test_imagenet_sampling_has_no_val(fake_imagenet):
    sampled = sample_few_shot(build_dataset("imagenet", fake_imagenet), shots=2, seed=3)
    assert len(sampled.train) == 10 and sampled.val == ()
    assert (fake_imagenet / "imagenet/split_fewshot/shot_2-seed_3.json").is_file()


def test_protocol_pairings():
    b2n = protocol_plan("b2n", "EuroSAT")
    assert b2n.train == ("eurosat", "base") and b2n.targets == (("eurosat", "base"), ("eurosat", "novel"))
    xd = protocol_plan("xd")
    assert xd.train == ("imagenet", "all") and xd.shots == 16
    assert [t for t, _ in xd.targets] == [
        "imagenet",
        "caltech101",
        "oxford_pets",
        "stanford_cars",
        "oxford_flowers",
        "food101",
        "fgvc_aircraft",
        "sun397",
        "dtd",
        "eurosat",
        "ucf101",
    ]
    dg = protocol_plan("dg")
    assert [t for t, _ in dg.targets] == ["imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert protocol_plan("fewshot", "dtd", shots=4).shots == 4
    with pytest.raises(DatasetError, match="unknown protocol"):
        protocol_plan("zeroshot", "dtd")
    with pytest.raises(DatasetError, match="needs a dataset"):
        protocol_plan("b2n")
