"""The results file: atomic rewrite after every case, ratios from the same run (vs eager, vs tuned, a runner epoch
vs its train step), sessions of one setup adding up, incomplete records named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .results import RECORD_FIELDS, ResultsFile, check_document, with_ratios

REPO = Path(__file__).resolve().parent.parent


def _record(method, contender, images_per_s, kind="train_step", peak=None):
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(kind=kind, workload="w", backbone="tiny", classes=4, batch=2, method=method, contender=contender,
                  status="ran", step_ms_median=2e3 / images_per_s, images_per_s=images_per_s, flops_per_step=1,
                  predicted_peak_bytes=1, memory_reason="cpu", floor_reason="no peak", peak_allocated_bytes=peak)
    if kind == "runner_epoch":
        record.update(step_ms_median=None, flops_per_step=None, epoch_s=1.0, epoch_steps=3, dataset_bytes=10)
    return record


def _file(folder, settings):
    return ResultsFile(folder, torch.device("cpu"), settings, {"flops": None, "source": "none"}, REPO)


def test_sessions_with_one_setup_add_up_and_others_start_afresh(tmp_path):
    first = _file(tmp_path, {"rounds": 2})
    first.add(_record("coop", "eager", 10.0))
    first.add(_record("coop", "fastprompt", 40.0))
    second = _file(tmp_path, {"rounds": 2})
    second.add(_record("maple", "eager", 5.0))
    second.add(_record("coop", "fastprompt", 30.0))  # re-run: replaces the earlier record
    second.add(_record("coop", "fastprompt", 25.0, kind="runner_epoch"))  # another kind: a record of its own
    document = json.loads(second.path.read_text())
    assert check_document(document) == []
    by_key = {(r["kind"], r["method"], r["contender"]): r for r in document["results"]}
    assert set(by_key) == {("train_step", "coop", "eager"), ("train_step", "coop", "fastprompt"),
                           ("train_step", "maple", "eager"), ("runner_epoch", "coop", "fastprompt")}
    assert by_key[("train_step", "coop", "fastprompt")]["speedup_vs_eager"] == pytest.approx(3.0)
    epoch = by_key[("runner_epoch", "coop", "fastprompt")]
    assert epoch["speedup_vs_eager"] is None and epoch["ratio_reason"] == "no eager record in this run"
    assert epoch["epoch_vs_train_step"] == pytest.approx(25.0 / 30.0) and epoch["epoch_vs_train_step_reason"] is None
    other = _file(tmp_path, {"rounds": 50})
    other.add(_record("mmrl", "eager", 1.0))
    assert [r["method"] for r in json.loads(other.path.read_text())["results"]] == ["mmrl"]
    assert [p.name for p in tmp_path.iterdir()] == [other.path.name]  # no temp files left behind


def test_ratios_to_eager_and_to_tuned_from_the_same_kind():
    skipped = dict(_record("maple", "tuned", 1.0), status="skipped", reason="compile off")
    records = with_ratios([
        _record("maple", "eager", 100.0, peak=800), _record("maple", "tuned", 250.0, peak=400),
        _record("maple", "fastprompt", 1000.0, peak=100), _record("maple", "fastprompt", 50.0, kind="inference"),
        _record("coop", "fastprompt", 90.0), skipped | {"method": "coop"},
    ])
    fast = records[2]
    assert (fast["speedup_vs_eager"], fast["memory_vs_eager"]) == (pytest.approx(10.0), pytest.approx(0.125))
    assert (fast["speedup_vs_tuned"], fast["memory_vs_tuned"]) == (pytest.approx(4.0), pytest.approx(0.25))
    assert records[1]["speedup_vs_tuned"] == 1.0 and records[0]["speedup_vs_tuned"] == pytest.approx(0.4)
    inference = records[3]  # no eager or tuned inference record: no ratio, and why
    assert inference["speedup_vs_tuned"] is None and inference["tuned_ratio_reason"] == "no tuned record in this run"
    assert inference["epoch_vs_train_step_reason"] == "runner_epoch records only"
    coop = records[4]
    assert coop["speedup_vs_tuned"] is None and coop["tuned_ratio_reason"] == "tuned did not run (skipped: compile off)"


def test_incomplete_records_are_named(tmp_path):
    document = _file(tmp_path, {}).document() | {"results": [_record("coop", "eager", 1.0)]}
    document["results"][0].update(status="skipped", reason=None)
    assert check_document(document) == ["train_step/w/coop/eager: skipped without a reason"]
    epoch = _record("coop", "eager", 1.0, kind="runner_epoch") | {"epoch_steps": 0}
    assert check_document(document | {"results": [epoch]}) == ["runner_epoch/w/coop/eager: epoch_steps = 0"]
    assert check_document(document | {"results": [epoch | {"kind": "epoch"}]}) == [
        "epoch/w/coop/eager: kind 'epoch' not in ('train_step', 'runner_epoch', 'inference')"]
    with pytest.raises(ValueError, match="lacks"):
        _file(tmp_path, {}).add({"workload": "w"})
