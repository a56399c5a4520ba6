"""The results file: atomic rewrite after every case, ratios from the same run, sessions of one setup adding up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .results import RECORD_FIELDS, ResultsFile, check_document

REPO = Path(__file__).resolve().parent.parent


def _record(method, contender, images_per_s):
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(workload="w", backbone="tiny", classes=4, batch=2, method=method, contender=contender, status="ran",
                  step_ms_median=2e3 / images_per_s, images_per_s=images_per_s, flops_per_step=1,
                  predicted_peak_bytes=1, memory_reason="cpu", floor_reason="no peak")
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
    document = json.loads(second.path.read_text())
    assert check_document(document) == []
    by_key = {(r["method"], r["contender"]): r for r in document["results"]}
    assert set(by_key) == {("coop", "eager"), ("coop", "fastprompt"), ("maple", "eager")}
    assert by_key[("coop", "fastprompt")]["speedup_vs_eager"] == pytest.approx(3.0)
    other = _file(tmp_path, {"rounds": 50})
    other.add(_record("mmrl", "eager", 1.0))
    assert [r["method"] for r in json.loads(other.path.read_text())["results"]] == ["mmrl"]
    assert [p.name for p in tmp_path.iterdir()] == [other.path.name]  # no temp files left behind


def test_incomplete_records_are_named(tmp_path):
    document = _file(tmp_path, {}).document() | {"results": [_record("coop", "eager", 1.0)]}
    document["results"][0].update(status="skipped", reason=None)
    assert check_document(document) == ["w/coop/eager: skipped without a reason"]
    with pytest.raises(ValueError, match="lacks"):
        _file(tmp_path, {}).add({"workload": "w"})
