"""Gradient accumulation and the gradient-sync hook of TrainStep.

accumulate=k splits each batch into k micro-batches and updates once: the reference is the textbook loop over the
whole batch (one forward, one backward, one step), which accumulation must equal. grad_sync sees the finished
gradient of the step (the whole batch's, whatever the micro-batching) before the non-finite guard.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastprompt
from fastprompt.training import TrainStep, make_optimizer, prompted_loss

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]


def _batches(n, batch, size=32):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, len(NAMES), (batch,), generator=g))
            for _ in range(n)]


def _model(tiny_clip, method):
    torch.manual_seed(0)
    model = fastprompt.build(method, copy.deepcopy(tiny_clip), NAMES)
    model.train()
    return model


def _whole_batch_loop(model, batches, lr):
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    losses = []
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = prompted_loss(model, images, labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


# MMRL's loss adds regularisers against the frozen model that do not depend on the images' split.
@pytest.mark.parametrize("method,batch,accumulate", [("maple", 6, 2), ("maple", 7, 3), ("mmrl", 6, 3), ("coop", 5, 5)])
def test_accumulated_steps_equal_whole_batch_steps(tiny_clip, method, batch, accumulate):
    batches = _batches(3, batch)
    reference = _model(tiny_clip, method)
    expected = _whole_batch_loop(reference, batches, lr=0.05)
    model = _model(tiny_clip, method)
    step = TrainStep(model, make_optimizer(model.trainable_parameters(), "sgd", lr=0.05), accumulate=accumulate)
    got = [float(step(images, labels)) for images, labels in batches]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for (name, p), q in zip(reference.method.named_parameters(), model.method.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    totals = step.totals()
    assert totals.images == 3 * batch and totals.skipped == 0
    assert totals.mean_loss == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_accumulation_keeps_one_micro_batch_of_activations(tiny_clip):
    """What autograd keeps alive at the peak shrinks with the micro-batch (the point of accumulating)."""
    from fastprompt.memory import saved_tensor_bytes

    images, labels = _batches(1, 8)[0]
    model = _model(tiny_clip, "maple")
    params = list(model.parameters())
    whole, _ = saved_tensor_bytes(lambda: prompted_loss(model, images, labels), exclude=params)
    part, _ = saved_tensor_bytes(lambda: prompted_loss(model, images[:2], labels[:2]), exclude=params)
    assert part < 0.5 * whole  # accumulate=4 keeps the graph of 2 images, not 8


def test_grad_sync_sees_the_whole_batch_gradient_once_per_step(tiny_clip):
    images, labels = _batches(1, 6)[0]
    reference = _model(tiny_clip, "maple")
    prompted_loss(reference, images, labels).backward()
    expected = [p.grad.clone() for p in reference.trainable_parameters()]

    calls = []
    model = _model(tiny_clip, "maple")
    step = TrainStep(model, make_optimizer(model.trainable_parameters(), "sgd", lr=0.0), accumulate=3,
                     grad_sync=lambda grads: calls.append([g.clone() for g in grads]))
    step(images, labels)
    assert len(calls) == 1
    assert len(calls[0]) == len(expected)
    for got, want in zip(calls[0], expected):  # fp32 sums in another order: tolerance relative to the largest entry
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_grad_sync_runs_before_the_nonfinite_guard(tiny_clip):
    """A sync that brings a non-finite gradient (another process's) makes every process skip the step."""
    images, labels = _batches(1, 4)[0]
    model = _model(tiny_clip, "coop")
    before = [p.detach().clone() for p in model.trainable_parameters()]

    def poison(grads):
        grads[0].fill_(float("nan"))

    step = TrainStep(model, make_optimizer(model.trainable_parameters(), "sgd", lr=0.1), grad_sync=poison)
    step(images, labels)
    assert step.totals().skipped == 1
    for p, q in zip(model.trainable_parameters(), before):
        assert torch.equal(p.detach(), q)


def test_bad_accumulation_arguments_are_refused():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="accumulate must be an int >= 1"):
            TrainStep(model, optimizer, accumulate=bad)
    with pytest.raises(TypeError, match="grad_sync must be callable"):
        TrainStep(model, optimizer, grad_sync=3)


def test_a_nonfinite_loss_with_finite_gradients_reaches_the_other_processes(tiny_clip):
    """One process's loss is inf while its gradients are finite (a constant term): the sync must carry that, or the
    processes would skip different steps and their prompts diverge."""
    images, labels = _batches(1, 4)[0]
    model = _model(tiny_clip, "coop")
    before = [p.detach().clone() for p in model.trainable_parameters()]
    synced = []

    def inf_loss(m, x, y):
        return prompted_loss(m, x, y) + torch.tensor(float("inf"))  # no gradient: the gradients stay finite

    step = TrainStep(model, make_optimizer(model.trainable_parameters(), "sgd", lr=0.1), loss_fn=inf_loss,
                     grad_sync=lambda grads: synced.append(bool(torch.isnan(grads[0]).any())))
    step(images, labels)
    assert synced == [True] and step.totals().skipped == 1
    for p, q in zip(model.trainable_parameters(), before):
        assert torch.equal(p.detach(), q)
