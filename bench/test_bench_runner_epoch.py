"""One epoch of the runner's training loop (fastprompt.training.train_epoch over TrainStep) on a synthetic 16-shot
set of the workload's classes, decoded once onto the device and augmented there as the runner does
(bench/synthetic.py): images/s of the whole epoch, loader time inside it, peak memory. One record of kind
`runner_epoch` per case, with its images/s as a share of the same case's train step (`epoch_vs_train_step`).
"""

from __future__ import annotations

import math

import pytest

from . import synthetic
from .harness import record_case
from .workloads import SHOTS

KIND = "runner_epoch"


@pytest.fixture(scope="module", autouse=True)
def _free_the_set():
    yield
    synthetic.release()  # the decoded set stays on the device only while this file runs


def test_runner_epoch(case, settings, results, benchmark):
    workload = case[0]
    record = record_case(KIND, case, settings, results, benchmark)
    assert math.isfinite(record["loss_last"]), record["reason"]
    # The whole epoch ran: every full batch of the 16-shot set (the last partial one dropped, as the runner does).
    assert record["epoch_steps"] == workload.classes * SHOTS // workload.batch
    assert record["images_per_s"] == pytest.approx(record["epoch_steps"] * workload.batch / record["epoch_s"])
    assert 0 <= record["loader_s"] < record["epoch_s"]
