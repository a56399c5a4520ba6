"""fastprompt.training: TrainStep equals a plain training loop, skips non-finite steps on the device (nothing
changes, nothing synchronises), reads the learning rate from a device tensor, and train_epoch/fit loop over it
with one host read per log interval. The CUDA-graph path itself (capture, replay, no re-capture on an lr change)
is in the GPU tier."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch

import fastprompt
from fastprompt import training
from fastprompt.training import (NonFiniteLossError, TrainStep, fit, lr_at, make_optimizer, prompted_loss, set_lr,
                                 train_epoch)

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]


def _batches(n, batch=2, size=32, classes=4, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, size, size, generator=g).to(device),
             torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(n)]


def _model(tiny_clip, method="maple"):
    torch.manual_seed(0)
    model = fastprompt.build(method, copy.deepcopy(tiny_clip), NAMES)
    model.train()
    return model


def _plain_loop(model, optimizer, batches, amp_dtype=None, lrs=None):
    """The textbook loop, with torch's default (non-fused) SGD and a float learning rate: the reference."""
    losses = []
    for i, (images, labels) in enumerate(batches):
        if lrs is not None:
            optimizer.param_groups[0]["lr"] = lrs[i]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = prompted_loss(model, images, labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _assert_close_state(a, b, tol=1e-6):
    for (name, p), q in zip(a.method.named_parameters(), b.method.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)


def test_make_optimizer_is_fused_with_a_device_learning_rate():
    params = [torch.nn.Parameter(torch.randn(3))]
    for name in ("sgd", "adamw"):
        optimizer = make_optimizer(params, name, lr=0.5)
        group = optimizer.param_groups[0]
        assert group["fused"] is True and torch.is_tensor(group["lr"]) and group["lr"].device == params[0].device
        rate = group["lr"]
        set_lr(optimizer, 0.25)
        assert group["lr"] is rate and float(rate) == 0.25  # filled in place: a captured graph keeps reading it
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adamw'"):
        make_optimizer(params, "lamb")
    with pytest.raises(ValueError, match="nothing to train"):
        make_optimizer([torch.nn.Parameter(torch.ones(1), requires_grad=False)])


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_steps_equal_a_plain_loop_and_say_why_there_is_no_graph(tiny_clip, amp_dtype, caplog):
    batches = _batches(3)
    lrs = [0.05, 0.05, 0.01]
    reference = _model(tiny_clip)
    expected = _plain_loop(reference, torch.optim.SGD(reference.trainable_parameters(), lr=0.05, momentum=0.9,
                                                      weight_decay=5e-4), batches, amp_dtype, lrs)
    model = _model(tiny_clip)
    step = TrainStep(model, make_optimizer(model.trainable_parameters(), "sgd", lr=0.05), amp_dtype=amp_dtype)
    with caplog.at_level(logging.INFO, logger="fastprompt.training"):
        losses = []
        for lr, (images, labels) in zip(lrs, batches):
            step.set_lr(lr)
            losses.append(float(step(images, labels)))
    assert losses == pytest.approx(expected, rel=1e-5)
    _assert_close_state(model, reference)
    assert step.mode == "eager" and step.steps == 3
    assert step.graph_reason == "CUDA graphs need CUDA tensors; the batch is on cpu"
    assert sum("no CUDA graph" in r.message for r in caplog.records) == 1  # logged once, not per step
    totals = step.totals()
    assert totals.images == 6 and totals.skipped == 0
    assert totals.mean_loss == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_a_failed_capture_falls_back_to_eager_with_the_reason(tiny_clip, monkeypatch, caplog):
    # Pretend the batch could be captured: on this CPU-only machine the capture itself then fails for real, which
    # is the path a capture failure on a GPU takes (a host sync inside the model, an uncapturable op).
    monkeypatch.setattr(training, "_graph_problem", lambda images: None)
    batches = _batches(4)
    reference = _model(tiny_clip, "coop")
    _plain_loop(reference, torch.optim.SGD(reference.trainable_parameters(), lr=0.05, momentum=0.9,
                                           weight_decay=5e-4), batches)
    model = _model(tiny_clip, "coop")
    step = TrainStep(model, make_optimizer(model.trainable_parameters(), lr=0.05), warmup_steps=2)
    with caplog.at_level(logging.WARNING, logger="fastprompt.training"):
        for images, labels in batches:
            step(images, labels)
    _assert_close_state(model, reference)  # warm-up, the failed capture's step and the rest: all real steps
    assert step.mode == "eager"
    assert step.graph_reason.startswith("CUDA graph capture failed: ")
    assert [r.message for r in caplog.records if "capture failed" in r.message][0].endswith("running eagerly")


class _FakeGraph:
    """Stands in for a captured CUDA graph on a CPU: a replay runs the step on the static tensors, and fails if the
    model's class set changed since the capture, as a real replay would then read freed prompt buffers."""

    def __init__(self, step):
        self.step, self.class_set = step, step.model.class_set_version
        self.storage = [p.data_ptr() for p in step._params]

    def replay(self):
        assert self.step.model.class_set_version == self.class_set, "replayed a graph of another class set"
        assert [p.data_ptr() for p in self.step._params] == self.storage, "replayed a graph of freed parameters"
        images, labels, loss = self.step._static
        loss.copy_(self.step._run_step(images, labels))


def _stand_in_graph_run(tiny_clip, monkeypatch, between_steps, method="coop"):
    """Eight steps of `method` through a TrainStep whose 'graph' is a _FakeGraph, `between_steps(model)` called before
    the fifth; the steps must equal the plain loop's. Returns the class-set versions each capture saw."""
    captures = []

    def capture(self, images, labels):
        captures.append(self.model.class_set_version)
        self._graph = _FakeGraph(self)
        self._static = (images.clone(), labels.clone(), torch.zeros(()))
        self._hyper = training._hyperparameters(self.optimizer)
        self._class_set = training._class_set(self.model)
        self._storages = training._storage_marks(self._params)

    monkeypatch.setattr(training, "_graph_problem", lambda images: None)
    monkeypatch.setattr(TrainStep, "_capture", capture)
    batches = _batches(8)
    reference = _model(tiny_clip, method)
    expected = _plain_loop(reference, torch.optim.SGD(reference.trainable_parameters(), lr=0.05, momentum=0.9,
                                                      weight_decay=5e-4), batches)
    model = _model(tiny_clip, method)
    step = TrainStep(model, make_optimizer(model.trainable_parameters(), lr=0.05), warmup_steps=2)
    losses = []
    for k, (images, labels) in enumerate(batches):
        if k == 4:
            between_steps(model)
        losses.append(step(images, labels))
    assert step.mode == "cuda_graph"
    torch.testing.assert_close(torch.stack(losses).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    _assert_close_state(model, reference)
    return captures


def test_parameters_in_new_storage_are_recaptured_after_one_eager_step(tiny_clip, monkeypatch):
    """A move or cast of the model (here: each trained tensor's data replaced by a copy, the values unchanged) gives
    the parameters new storage; a replay would update the old, freed storage."""

    def new_storage(model):
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.data = p.data.clone()

    assert len(_stand_in_graph_run(tiny_clip, monkeypatch, new_storage)) == 2


def test_one_parameter_in_new_storage_is_recaptured(tiny_clip, monkeypatch):
    """One of MaPLe's 27 trained tensors, neither the first nor the last, given new storage (`p.data = ...`, as a
    hand-loaded prompt would be): every parameter's address is checked, not a sample of them."""

    def one_new_storage(model):
        params = list(model.trainable_parameters())
        assert len(params) > 2
        with torch.no_grad():
            params[len(params) // 2].data = params[len(params) // 2].data.clone()

    assert len(_stand_in_graph_run(tiny_clip, monkeypatch, one_new_storage, method="maple")) == 2


def test_a_new_class_set_is_recaptured_after_one_eager_step(tiny_clip, monkeypatch):
    """set_classnames (evaluating novel classes mid-training, then back) rebuilds the prompt buffers a training
    graph reads: the step must not replay the old graph, but take one eager step (building the new buffers, which
    reads the host) and capture again."""

    def evaluate_other_classes(model):
        model.set_classnames(["purple hexagon", "orange oval"])
        model.set_classnames(NAMES)

    # warm-up 2, capture at step 3 (run by the graph), replay at 4; new class set: eager step 5, capture at 6.
    assert _stand_in_graph_run(tiny_clip, monkeypatch, evaluate_other_classes) == [0, 2]


def test_cuda_graph_required_on_cpu_is_an_error(tiny_clip):
    model = _model(tiny_clip, "coop")
    step = TrainStep(model, make_optimizer(model.trainable_parameters()), cuda_graph=True)
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


OPTIMIZERS = {
    "fused sgd": lambda params: make_optimizer(params, "sgd", lr=0.1, weight_decay=0.01),
    "fused adamw": lambda params: make_optimizer(params, "adamw", lr=0.1),
    "plain sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
    "plain adamw": lambda params: torch.optim.AdamW(params, lr=0.1),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_nonfinite_step_changes_nothing(optimizer, poison):
    data = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(3)]

    if poison == "loss":
        bad = (data[0][0], torch.full((4, 2), float("nan")))
        loss_fn = _linear_loss
    else:
        # A finite loss whose gradient overflows: the inf enters only through the backward pass.
        class InfGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                return torch.full_like(g, float("inf"))

        bad = (data[0][0].clone(), torch.full((4, 2), 7.0))

        def loss_fn(model, x, y):
            out = model(x)
            out = InfGrad.apply(out) if bool((y == 7.0).all()) else out
            return torch.nn.functional.mse_loss(out, y)

    def run(batches, skip):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        step = TrainStep(model, OPTIMIZERS[optimizer](list(model.parameters())), loss_fn=loss_fn,
                         skip_nonfinite=skip)
        losses = [step(x, y) for x, y in batches]
        return model, step, losses

    clean, clean_step, _ = run(data, skip=True)
    # The bad step comes first (state is created by it) and in the middle (state exists): both are no-ops.
    guarded, step, _ = run([bad, data[0], data[1], bad, bad, data[2]], skip=True)
    totals = step.totals()
    assert totals.skipped == 3 and totals.longest_bad_run == 2 and totals.images == 12
    assert totals.mean_loss == pytest.approx(clean_step.totals().mean_loss, rel=1e-6)
    for p, q in zip(guarded.parameters(), clean.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    unguarded, _, _ = run([bad, *data], skip=False)
    assert not torch.isfinite(unguarded.weight).all()  # what the guard prevents


def test_train_epoch_reads_the_device_once_per_log_interval(tiny_clip, monkeypatch):
    model = _model(tiny_clip, "coop")
    step = TrainStep(model, make_optimizer(model.trainable_parameters(), lr=0.05))
    reads = []
    original = TrainStep.totals
    monkeypatch.setattr(TrainStep, "totals", lambda self: reads.append(1) or original(self))
    logged, seen = [], []
    batches = _batches(5) + [_batches(1, batch=1)[0]]  # a last partial batch: stepped eagerly and counted
    stats = train_epoch(step, batches, log_every=2, on_log=lambda i, loss: logged.append((i, loss)),
                        progress=seen.append)
    assert len(reads) == 3  # after steps 2, 4 and 6, and none otherwise (the end reuses the last read)
    assert [i for i, _ in logged] == [1, 3, 5]
    assert seen == [2, 2, 2, 2, 2, 1] and stats.images == 11 and stats.steps == 6 and stats.delivered == 11
    assert stats.skipped_steps == 0 and stats.loss == pytest.approx(logged[-1][1])
    assert stats.seconds > 0 and stats.loader_seconds >= 0


def test_train_epoch_stops_after_the_bound_of_skipped_steps_in_a_row():
    model = torch.nn.Linear(3, 2)
    step = TrainStep(model, make_optimizer(model.parameters(), lr=0.1), loss_fn=_linear_loss)
    good = (torch.randn(4, 3), torch.randn(4, 2))
    bad = (torch.randn(4, 3), torch.full((4, 2), float("nan")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = train_epoch(step, [bad, bad, good, bad, good], max_bad_steps=3, log_every=10)
    assert stats.skipped_steps == 3 and stats.images == 8
    assert any("3 step(s) with a non-finite loss or gradient skipped" in str(w.message) for w in caught)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        train_epoch(step, [good, bad, bad, bad, good, good], max_bad_steps=3, log_every=100)
    # The skipped steps changed nothing: only the three good steps moved the weights.
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_fit_sets_each_epochs_learning_rate_through_the_device_tensor():
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model.parameters(), lr=0.1)
    rate = optimizer.param_groups[0]["lr"]
    step = TrainStep(model, optimizer, loss_fn=_linear_loss)
    data = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(2)]
    seen = []
    history = fit(step, data, 3, lambda e: lr_at(e, 3, 0.1), on_epoch_end=lambda e, lr, s: seen.append(
        (e, lr, float(optimizer.param_groups[0]["lr"]))))
    assert len(history) == 3 and optimizer.param_groups[0]["lr"] is rate
    assert [(e, round(a, 8)) for e, a, _ in seen] == [(e, round(lr_at(e, 3, 0.1), 8)) for e in (1, 2, 3)]
    assert all(a == pytest.approx(b) for _, a, b in seen)


# --- GPU tier: the graph path itself ----------------------------------------------------------------------
@pytest.mark.gpu
def test_a_graphed_prompted_step_follows_a_class_set_change(tiny_clip, caplog):
    """A real capture of a prompted model, then an evaluation's set_classnames and back between steps: the graphed
    steps equal eager twins' throughout (a stale replay would read freed prompt buffers)."""
    models = [_model(tiny_clip, "maple").cuda() for _ in range(2)]
    steps = [TrainStep(m, make_optimizer(m.trainable_parameters(), lr=0.05), warmup_steps=2, cuda_graph=graph)
             for m, graph in zip(models, (True, False))]
    with caplog.at_level(logging.INFO, logger="fastprompt.training"):
        for k, (images, labels) in enumerate(_batches(8, device="cuda")):
            if k == 4:
                for m in models:
                    m.set_classnames(["purple hexagon", "orange oval"])
                    m.set_classnames(NAMES)
            graphed, eager = (step(images, labels) for step in steps)
            torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    assert steps[0].mode == "cuda_graph"
    assert sum("captured the training step" in r.message for r in caplog.records) == 2
    _assert_close_state(*models, tol=1e-5)


@pytest.mark.gpu
def test_graph_replays_equal_eager_steps_without_recapture_on_an_lr_change(caplog):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)).cuda()
    reference = copy.deepcopy(model)
    batches = [(torch.randn(8, 16, device="cuda"), torch.randn(8, 4, device="cuda")) for _ in range(8)]
    odd = (torch.randn(5, 16, device="cuda"), torch.randn(5, 4, device="cuda"))
    nan = (batches[0][0], torch.full((8, 4), float("nan"), device="cuda"))

    def loss_fn(m, x, y):
        return torch.nn.functional.mse_loss(m(x), y)

    optimizer = make_optimizer(model.parameters(), lr=0.05, weight_decay=0.0)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    step = TrainStep(model, optimizer, loss_fn=loss_fn, warmup_steps=2)
    ref_step = TrainStep(reference, ref_opt, loss_fn=loss_fn, cuda_graph=False)
    schedule = batches[:4] + [odd, nan] + batches[4:6] + ["lr"] + batches[6:]
    with caplog.at_level(logging.INFO, logger="fastprompt.training"):
        for item in schedule:
            if item == "lr":
                step.set_lr(0.01)
                set_lr(ref_opt, 0.01)
                continue
            if item is nan:
                step(*item)  # skipped on the device: the reference does not see it
                continue
            torch.testing.assert_close(step(*item), ref_step(*item), rtol=1e-5, atol=1e-6)
    assert step.mode == "cuda_graph"
    assert sum("captured the training step" in r.message for r in caplog.records) == 1  # no re-capture
    assert step.totals().skipped == 1
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False])
def test_adamw_replays_match(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).cuda()
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model.parameters(), "adamw", lr=0.01) if fused else \
        torch.optim.AdamW(model.parameters(), lr=0.01)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
    step = TrainStep(model, optimizer, loss_fn=lambda m, x, y: (m(x) - y).square().mean(), warmup_steps=1)
    ref_step = TrainStep(reference, ref_opt, loss_fn=lambda m, x, y: (m(x) - y).square().mean(), cuda_graph=False)
    for _ in range(5):
        x, y = torch.randn(8, 16, device="cuda"), torch.randn(8, 4, device="cuda")
        step(x, y), ref_step(x, y)
    assert step.mode == "cuda_graph"
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


_WORKSPACES_SCRIPT = """
import sys, torch
from fastprompt.training import TrainStep, make_optimizer
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 4)).cuda()
step = TrainStep(model, make_optimizer(model.parameters(), lr=0.05), warmup_steps=2,
                 loss_fn=lambda m, x, y: torch.nn.functional.mse_loss(m(x), y), cuda_graph=sys.argv[1] == "graph")
for _ in range(5):
    step(torch.randn(32, 64, device="cuda"), torch.randn(32, 4, device="cuda"))
torch.cuda.synchronize()
before = torch.cuda.memory_allocated()
torch._C._cuda_clearCublasWorkspaces()  # what torch's own leak checks do to leave the workspaces out
print(step.mode, before - torch.cuda.memory_allocated())
"""


@pytest.mark.gpu
def test_a_graphed_step_holds_the_cublas_workspaces_of_one_stream():
    """cuBLAS keeps a workspace per (thread, stream) that ran a GEMM, for the life of the process. A graphed
    TrainStep warms up and captures on one side stream, so a fresh process holds exactly the workspaces of an eager
    TrainStep on the current stream (forward and autograd threads), as memory.train_step_blas_workspaces says."""
    import subprocess
    import sys

    freed = {}
    for mode in ("graph", "eager"):
        done = subprocess.run([sys.executable, "-c", _WORKSPACES_SCRIPT, mode], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        ran, nbytes = done.stdout.split()
        assert ran == ("cuda_graph" if mode == "graph" else "eager")
        freed[mode] = int(nbytes)
    from fastprompt.memory import blas_workspace_bytes, train_step_blas_workspaces

    assert freed["graph"] == freed["eager"] > 0
    assert freed["graph"] == train_step_blas_workspaces(cuda_graph=True) * blas_workspace_bytes("cuda")


def test_a_slow_loader_is_reported_as_the_limit():
    import time as _time

    model = torch.nn.Linear(3, 2)
    step = TrainStep(model, make_optimizer(model.parameters(), lr=0.1), loss_fn=_linear_loss)
    data = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(3)]

    def slow():
        for batch in data:
            _time.sleep(0.05)  # far longer than a step of a 3x2 linear model
            yield batch

    stats = train_epoch(step, slow())
    assert stats.loader_bound and stats.loader_seconds >= 0.15 and stats.delivered == 12
    assert stats.loader_images_per_second == pytest.approx(12 / stats.loader_seconds)
    fast = train_epoch(step, data)
    assert not fast.loader_bound
    assert stats.starved_steps is None and fast.starved_steps is None  # a CPU runs work as it is issued


def _slow_loader(data, seconds):
    import time as _time

    for batch in data:
        _time.sleep(seconds)
        yield batch


@pytest.mark.parametrize("device_idle, blamed", [(True, True), (False, False)])
def test_on_a_gpu_the_loader_is_blamed_only_when_batches_find_the_device_idle(monkeypatch, device_idle, blamed):
    """On a GPU the host runs ahead: a loader taking half the epoch is hidden when the device still has queued
    steps each time a batch comes (GPU-bound), and the limit when the device has run out of work. The device's
    answer is stood in for here (training._device_idle; a CUDA stream's query() on a GPU, tested in the GPU tier)."""
    model = torch.nn.Linear(3, 2)
    step = TrainStep(model, make_optimizer(model.parameters(), lr=0.1), loss_fn=_linear_loss)
    data = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(4)]
    asked = []
    monkeypatch.setattr(training, "_device_idle", lambda device: asked.append(device) or device_idle)
    stats = train_epoch(step, _slow_loader(data, 0.05))
    assert len(asked) == 4 and stats.loader_seconds > 0.25 * stats.seconds
    assert stats.starved_steps == (4 if device_idle else 0)
    assert stats.loader_bound is blamed


@pytest.mark.gpu
def test_a_gpu_bound_epoch_does_not_blame_a_slow_loader():
    """Each step keeps the GPU busy 40 ms (a spinning kernel); the loader sleeps 15 ms per batch: a third of the
    epoch is spent in the loader, hidden behind the queued steps. With no GPU work the same loader is the limit."""
    model = torch.nn.Linear(3, 2).cuda()
    data = [(torch.randn(4, 3, device="cuda"), torch.randn(4, 2, device="cuda")) for _ in range(8)]
    cycles = 80_000_000  # 40 ms at 2 GHz, more at lower clocks

    def busy_loss(m, x, y):
        torch.cuda._sleep(cycles)
        return _linear_loss(m, x, y)

    busy = train_epoch(TrainStep(model, make_optimizer(model.parameters(), lr=0.1), loss_fn=busy_loss,
                                 cuda_graph=False), _slow_loader(data, 0.015), device="cuda")
    assert busy.loader_seconds > 0.25 * busy.seconds and busy.starved_steps <= 2 and not busy.loader_bound
    idle = train_epoch(TrainStep(model, make_optimizer(model.parameters(), lr=0.1), loss_fn=_linear_loss,
                                 cuda_graph=False), _slow_loader(data, 0.015), device="cuda")
    assert idle.starved_steps >= 6 and idle.loader_bound


@pytest.mark.parametrize("optimizer", ["fused sgd", "fused adamw"])
def test_compiled_steps_equal_eager_steps_and_still_skip_a_nonfinite_one(optimizer):
    """TrainStep(compile=True), traced by TorchDynamo (its 'eager' backend: the graph capture without inductor's
    minutes of code generation on a CPU), steps exactly as the eager step, the guarded fused update included: a NaN
    batch changes nothing. Until the fused update ran outside the traced region, setting and deleting the
    optimizer's found_inf inside it raised AttributeError."""
    import torch._dynamo

    data = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(3)]
    batches = [data[0], (data[1][0], torch.full((4, 2), float("nan"))), data[1], data[2]]

    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        step = TrainStep(model, OPTIMIZERS[optimizer](list(model.parameters())), loss_fn=_linear_loss,
                         compile=compiled, compile_options={"backend": "eager"} if compiled else None)
        for x, y in batches:
            step(x, y)
        return model, step.totals()

    torch._dynamo.reset()
    (eager, eager_totals), (compiled, compiled_totals) = run(False), run(True)
    assert compiled_totals.skipped == eager_totals.skipped == 1
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
