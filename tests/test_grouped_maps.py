"""Coupling maps of all prompted layers in one grouped launch equal the per-layer maps (loss and every
parameter gradient). Runs the Triton grouped kernels (interpreter on CPU)."""

import pytest
import torch

import fastprompt

NAMES = ["red circle", "blue square", "green triangle"]


@pytest.mark.parametrize("name,options,kind,members", [
    ("maple", {}, "linear", 9),                              # F_1..F_9
    ("mcpl", {}, "bottleneck", 9),                           # PMS_1..PMS_9 (Linear-ReLU-Linear)
    ("mcpl", {"shared_pms": True}, "bottleneck", 9),         # one shared PMS stacked nine times
    ("mcpl", {"free_visual_prompts": True}, "bottleneck", 9),  # the maps under a free block's sum
    # MuDPT's linear injection: E_0 and the 11 + 11 deep couplings (tiny: one width), shared or per layer.
    ("mudpt", {"injection": "linear", "maps": "shared"}, "linear", 23),
    ("mudpt", {"injection": "linear", "maps": "per_layer"}, "linear", 23),
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_grouped_coupling_maps_equal_per_layer_maps(tiny_clip, name, options, kind, members):
    torch.manual_seed(0)
    per_layer = fastprompt.build(name, tiny_clip, NAMES, **options)
    grouped = fastprompt.build(name, tiny_clip, NAMES, **options)
    grouped.method.load_state_dict(per_layer.method.state_dict())
    grouped.use_grouped_maps = True
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    losses = []
    for model in (per_layer, grouped):
        loss, _ = model.loss(model(images), labels)
        loss.backward()
        losses.append(loss)
    groups = grouped._grouped.groups
    assert [(k[0], len(v)) for k, v in groups.items()] == [(kind, members)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (pname, a), b in zip(per_layer.method.named_parameters(), grouped.method.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=pname)
