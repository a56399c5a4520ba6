"""Every method trains on the tiny CLIP: gradients reach exactly the trainable parameters, frozen CLIP
weights stay bit-identical, and the loss decreases over a few steps in fp32 and under bf16 autocast."""

import pytest
import torch

import fastprompt

NAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross"]
METHOD_NAMES = sorted(set(fastprompt.METHODS) - {"clip"})


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2][:n])


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_gradients_reach_exactly_the_trainable_parameters(tiny_clip, name):
    model = fastprompt.build(name, tiny_clip, NAMES)
    images, labels = batch()
    loss, _ = model.loss(model(images), labels)
    loss.backward()
    trainable = dict(model.method.named_parameters())
    assert trainable, "a prompt method must have trainable parameters"
    for pname, p in trainable.items():
        assert p.grad is not None, f"{pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"
    assert all(p.grad is None for p in tiny_clip.parameters())


@pytest.mark.parametrize("name", ["maple", "mmrl", "cocoop"])
def test_frozen_clip_is_bit_identical_after_optimizer_steps(tiny_clip, name):
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    model = fastprompt.build(name, tiny_clip, NAMES)
    # An optimizer over *all* parameters with weight decay: frozen ones must still not move.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    images, labels = batch()
    for _ in range(2):
        loss, _ = model.loss(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = tiny_clip.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_loss_decreases_over_a_few_steps(tiny_clip, name, precision):
    torch.manual_seed(0)
    model = fastprompt.build(name, tiny_clip, NAMES)
    images, labels = batch(8)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
            out = model(images)
            loss, parts = model.loss(out, labels)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.98, losses
