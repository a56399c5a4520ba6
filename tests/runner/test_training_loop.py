"""The shared loop (fastprompt/training.py): the Dassl schedule, the non-finite guard, macro-F1 against a
hand count, evaluation that never updates, and the precision modes of the runner."""

import math
import warnings

import pytest
import torch

import fastprompt
from fastprompt.runner.engine import numerics
from fastprompt.evaluation import evaluate, macro_f1
from fastprompt.training import NonFiniteLossError, TrainStep, lr_at, make_optimizer, peak_memory, train_epoch

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]


def test_schedule_is_constant_warmup_then_cosine_over_all_epochs():
    assert lr_at(1, 5, 0.0035) == 1e-5
    for epoch in range(2, 6):
        assert lr_at(epoch, 5, 0.0035) == pytest.approx(0.0035 * (1 + math.cos(math.pi * (epoch - 2) / 5)) / 2)
    assert [lr_at(e, 2, 1.0, warmup_epochs=0) for e in (1, 2)] == [1.0, pytest.approx(0.5)]  # MMRL xd: no warm-up
    with pytest.raises(ValueError, match="outside 1..5"):
        lr_at(6, 5, 0.1)


def test_macro_f1_against_a_hand_count():
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    target = torch.tensor([0, 1, 1, 1, 2, 0])
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 0 fn 1 -> 0.8; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert macro_f1(pred, target, 4) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


class _Poisoned(torch.nn.Module):
    """Wraps a model so that chosen steps produce a NaN loss."""

    def __init__(self, model, bad_steps):
        super().__init__()
        self.model, self.bad_steps, self.step = model, set(bad_steps), 0
        self.classnames = model.classnames

    def forward(self, x):
        return self.model(x)

    def loss(self, out, y):
        loss, parts = self.model.loss(out, y)
        self.step += 1
        return (loss * float("nan") if self.step in self.bad_steps else loss), parts


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 1])) for _ in range(n)]


def test_a_nan_step_is_skipped_with_a_warning_and_too_many_stop_the_run(tiny_clip):
    model = fastprompt.build("coop", tiny_clip, NAMES, n_ctx=4)
    optimizer = make_optimizer(model.trainable_parameters(), "sgd", 0.01)
    wrapped = _Poisoned(model, bad_steps={2})
    before = model.method.state_dict()["text_sources.1.tokens"].clone()
    with pytest.warns(RuntimeWarning, match="1 step\\(s\\) with a non-finite loss or gradient skipped"):
        stats = train_epoch(TrainStep(wrapped, optimizer), _batches(3), device="cpu")
    assert stats.skipped_steps == 1 and stats.images == 4 and math.isfinite(stats.loss)
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())
    assert not torch.equal(before, model.method.state_dict()["text_sources.1.tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
            train_epoch(TrainStep(_Poisoned(model, bad_steps={1, 2, 3}), optimizer), _batches(4), device="cpu",
                        max_bad_steps=3)


def test_evaluate_never_updates_and_reports_metrics(tiny_clip):
    model = fastprompt.build("maple", tiny_clip, NAMES)
    before = {k: v.clone() for k, v in model.method.state_dict().items()}
    metrics = evaluate(model, _batches(2), "cpu")
    assert metrics["images"] == 4 and 0 <= metrics["accuracy"] <= 100 and 0 <= metrics["macro_f1"] <= 100
    assert all(torch.equal(before[k], v) for k, v in model.method.state_dict().items())


def test_precision_modes():
    # auto on CUDA depends on the GPU's compute capability: tests/test_pre_ampere.py.
    cpu = torch.device("cpu")
    assert numerics("auto", cpu).name == "fp32"
    bf16 = numerics("bf16", cpu)
    assert (bf16.clip_precision, bf16.amp_dtype, bf16.input_dtype) == ("bf16", torch.bfloat16, None)
    parity = numerics("fp16-parity", cpu)
    assert (parity.clip_precision, parity.amp_dtype, parity.input_dtype) == ("fp16", None, torch.float16)


def test_fp16_parity_keeps_fp32_prompt_masters_and_trains():
    from fastprompt.backbones import create_clip

    clip = create_clip("tiny", precision="fp16")
    model = fastprompt.build("coop", clip, NAMES, n_ctx=4)
    assert clip.visual.conv1.weight.dtype == clip.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    optimizer = make_optimizer(model.trainable_parameters(), "sgd", 0.01)
    before = model.trainable_parameters()[0].detach().clone()
    stats = train_epoch(TrainStep(model, optimizer), _batches(2), device="cpu", input_dtype=torch.float16)
    assert stats.skipped_steps == 0 and math.isfinite(stats.loss)
    assert not torch.equal(before, model.trainable_parameters()[0])


def test_peak_memory_on_cpu_is_the_process_rss():
    value, kind = peak_memory("cpu")
    assert kind == "peak RSS" and value > 10 * 2**20
