"""fastprompt.step.TrainStep: the same updates as a plain training loop, clean fallbacks with the reason, non-finite
steps skipped without a host sync; the CUDA-graph path itself (capture, replay, re-capture) in the GPU tier."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import fastprompt
from fastprompt import step as step_module
from fastprompt.step import CONTENDERS, TrainStep, build_contender, prompted_loss

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]


def _batches(n, batch=2, size=32, classes=4, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, size, size, generator=g).to(device),
             torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(n)]


def _model(tiny_clip, method="maple"):
    torch.manual_seed(0)
    model = fastprompt.build(method, copy.deepcopy(tiny_clip), NAMES)
    model.train()
    return model, torch.optim.SGD(model.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def _plain_loop(model, optimizer, batches, amp_dtype=None):
    losses = []
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = prompted_loss(model, images, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from a thread pool, and on a busy 2-core machine an oversubscribed one costs 5-10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_same_state(a, b):
    for (name, p), q in zip(a.method.named_parameters(), b.method.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_cpu_steps_equal_a_plain_loop_and_say_why_there_is_no_graph(tiny_clip, amp_dtype, caplog):
    batches = _batches(2)
    reference, ref_opt = _model(tiny_clip)
    expected = _plain_loop(reference, ref_opt, batches, amp_dtype)
    model, optimizer = _model(tiny_clip)
    step = TrainStep(model, optimizer, amp_dtype=amp_dtype)
    with caplog.at_level(logging.INFO, logger="fastprompt.step"):
        losses = [step(images, labels) for images, labels in batches]
    assert [float(x) for x in losses] == [float(x) for x in expected]
    _assert_same_state(model, reference)
    assert step.mode == "eager" and step.steps == 2
    assert step.graph_reason == "CUDA graphs need CUDA tensors; the batch is on cpu"
    assert sum("no CUDA graph" in r.message for r in caplog.records) == 1  # logged once, not per step


def test_a_failed_capture_falls_back_to_eager_with_the_reason(tiny_clip, monkeypatch, caplog):
    # Pretend the batch could be captured: on this CPU-only machine the capture itself then fails for real, which
    # is the path a capture failure on a GPU takes (a host sync inside the model, an uncapturable op).
    monkeypatch.setattr(step_module, "_graph_problem", lambda images: None)
    batches = _batches(4)
    reference, ref_opt = _model(tiny_clip, "coop")
    _plain_loop(reference, ref_opt, batches)
    model, optimizer = _model(tiny_clip, "coop")
    step = TrainStep(model, optimizer, warmup_steps=2)
    with caplog.at_level(logging.WARNING, logger="fastprompt.step"):
        for images, labels in batches:
            step(images, labels)
    _assert_same_state(model, reference)  # warm-up, the failed capture's step and the rest: all real steps
    assert step.mode == "eager"
    assert step.graph_reason.startswith("CUDA graph capture failed: ")
    assert [r.message for r in caplog.records if "capture failed" in r.message][0].endswith("running eagerly")


def test_cuda_graph_required_on_cpu_is_an_error(tiny_clip):
    model, optimizer = _model(tiny_clip, "coop")
    step = TrainStep(model, optimizer, cuda_graph=True)
    images, labels = _batches(1)[0]
    with pytest.raises(RuntimeError, match="cuda_graph=True but CUDA graphs need CUDA tensors"):
        step(images, labels)


def test_bad_arguments_are_refused():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="cuda_graph"):
        TrainStep(model, optimizer, cuda_graph="yes")
    with pytest.raises(ValueError, match="reduce-overhead"):
        TrainStep(model, optimizer, compile=True, cuda_graph=True)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainStep(model, optimizer, warmup_steps=0)
    with pytest.raises(ValueError, match="amp_dtype"):
        TrainStep(model, optimizer, amp_dtype=torch.float64)


def _linear_loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda params: torch.optim.AdamW(params, lr=0.1),
])
def test_a_nonfinite_step_changes_nothing(make_optimizer):
    data = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(3)]
    poisoned = (data[0][0], torch.full((4, 2), float("nan")))

    def run(batches, skip):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        step = TrainStep(model, make_optimizer(model.parameters()), loss_fn=_linear_loss, skip_nonfinite=skip)
        for x, y in batches:
            step(x, y)
        return model, step

    clean, _ = run(data, skip=True)
    # The NaN step comes first (state is created by it) and in the middle (state exists): both are no-ops.
    guarded, step = run([poisoned, data[0], data[1], poisoned, data[2]], skip=True)
    assert step.skipped_steps == 2
    for p, q in zip(guarded.parameters(), clean.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    unguarded, _ = run([poisoned, *data], skip=False)
    assert not torch.isfinite(unguarded.weight).all()  # what the guard prevents


def test_contenders_build_what_they_promise():
    eager, eager_step = build_contender("eager", "coop", NAMES, backbone="tiny", amp_dtype=torch.bfloat16)
    assert not fastprompt.is_patched(eager.clip) and not eager.uses_packed_text()
    assert eager.truncate_text is False and eager.clip.visual.conv1.weight.dtype == torch.float32
    assert eager_step.mode == "eager" and eager_step.amp_dtype == torch.bfloat16
    fast, fast_step = build_contender("fastprompt", "coop", NAMES, backbone="tiny", amp_dtype=torch.bfloat16)
    assert fastprompt.is_patched(fast.clip) and fast.uses_packed_text()
    assert fast.clip.visual.conv1.weight.dtype == torch.bfloat16  # frozen weights in the autocast dtype
    assert fast_step.cuda_graph == "auto"
    _, compiled_step = build_contender("compiled", "coop", NAMES, backbone="tiny", amp_dtype=None)
    assert compiled_step.mode == "compiled" and compiled_step.graph_reason == "compile=True"
    assert CONTENDERS["fastprompt"].clip_precision(None) == "fp32"
    with pytest.raises(ValueError, match="unknown contender 'fast'"):
        build_contender("fast", "coop", NAMES, backbone="tiny")


# --- GPU tier: the graph path itself ----------------------------------------------------------------------
@pytest.mark.gpu
def test_graph_replays_equal_eager_steps_and_recapture_on_lr_change():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)).cuda()
    reference = copy.deepcopy(model)
    batches = [(torch.randn(8, 16, device="cuda"), torch.randn(8, 4, device="cuda")) for _ in range(8)]
    odd = (torch.randn(5, 16, device="cuda"), torch.randn(5, 4, device="cuda"))

    def loss_fn(m, x, y):
        return torch.nn.functional.mse_loss(m(x), y)

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = TrainStep(model, optimizer, loss_fn=loss_fn, warmup_steps=2)
    ref_step = TrainStep(reference, ref_opt, loss_fn=loss_fn, cuda_graph=False)
    schedule = batches[:4] + [odd] + batches[4:6] + ["lr"] + batches[6:]
    for item in schedule:
        if item == "lr":
            for opt in (optimizer, ref_opt):
                opt.param_groups[0]["lr"] = 0.01
            continue
        torch.testing.assert_close(step(*item), ref_step(*item), rtol=1e-5, atol=1e-6)
    assert step.mode == "cuda_graph"
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_adamw_is_made_capturable_and_replays_match():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).cuda()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
    step = TrainStep(model, optimizer, loss_fn=lambda m, x, y: (m(x) - y).square().mean(), warmup_steps=1)
    ref_step = TrainStep(reference, ref_opt, loss_fn=lambda m, x, y: (m(x) - y).square().mean(), cuda_graph=False)
    for _ in range(5):
        x, y = torch.randn(8, 16, device="cuda"), torch.randn(8, 4, device="cuda")
        step(x, y), ref_step(x, y)
    assert step.mode == "cuda_graph" and optimizer.param_groups[0]["capturable"] is True
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["maple", "cocoop", "mmrl"])
def test_fastprompt_contender_captures_and_matches_eager(method):
    model, step = build_contender("fastprompt", method, NAMES, backbone="tiny", device="cuda",
                                  amp_dtype=torch.bfloat16, warmup_steps=2)
    reference, ref_step = build_contender("fastprompt", method, NAMES, backbone="tiny", device="cuda",
                                          amp_dtype=torch.bfloat16)
    ref_step.cuda_graph = False
    for images, labels in _batches(6, device="cuda"):
        torch.testing.assert_close(step(images, labels), ref_step(images, labels), rtol=2e-2, atol=2e-2)
    assert step.mode == "cuda_graph", step.graph_reason
    for p, q in zip(model.trainable_parameters(), reference.trainable_parameters()):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3)
