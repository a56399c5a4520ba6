"""Coupling maps of all prompted layers in one grouped launch equal the per-layer maps (loss and every
parameter gradient). Runs the Triton grouped kernels (interpreter on CPU)."""

import copy

import pytest
import torch

import fastprompt

NAMES = ["red circle", "blue square", "green triangle"]


# MCPL: the shared prompt self-attention S over the nine layers' tokens in one batched pass, then PMS_1..PMS_9
# (Linear-ReLU-Linear) grouped on S's outputs; S runs first because the PMS reads what it wrote.
MCPL_GROUPS = [("batched", 9), ("bottleneck", 9)]


@pytest.mark.parametrize("name,options,groups", [
    ("maple", {}, [("linear", 9)]),                          # F_1..F_9
    ("mcpl", {}, MCPL_GROUPS),
    ("mcpl", {"shared_pms": True}, MCPL_GROUPS),             # one shared PMS stacked nine times
    ("mcpl", {"free_visual_prompts": True}, MCPL_GROUPS),    # the maps under a free block's sum
    ("mcpl", {"sa_scope": "joint"}, [("bottleneck", 9)]),    # S over all layers' tokens jointly: one call already
    # MuDPT's linear injection: E_0 and the 11 + 11 deep couplings (tiny: one width), shared or per layer.
    ("mudpt", {"injection": "linear", "maps": "shared"}, [("linear", 23)]),
    ("mudpt", {"injection": "linear", "maps": "per_layer"}, [("linear", 23)]),
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_grouped_coupling_maps_equal_per_layer_maps(tiny_clip, kernel_device, name, options, groups):
    # The grouped kernels run where the kernel tests run them: compiled on a GPU (fp32, IEEE), interpreted on a CPU.
    clip = copy.deepcopy(tiny_clip).to(kernel_device)
    torch.manual_seed(0)
    per_layer = fastprompt.build(name, clip, NAMES, **options)
    grouped = fastprompt.build(name, clip, NAMES, **options)
    grouped.method.load_state_dict(per_layer.method.state_dict())
    grouped.use_grouped_maps = True
    images = torch.randn(2, 3, 32, 32, device=kernel_device)
    labels = torch.tensor([0, 2], device=kernel_device)
    losses = []
    for model in (per_layer, grouped):
        loss, _ = model.loss(model(images), labels)
        loss.backward()
        losses.append(loss)
    assert [(k[0], len(v)) for k, v in grouped._grouped.groups.items()] == groups
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (pname, a), b in zip(per_layer.method.named_parameters(), grouped.method.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=pname)


def test_mcpl_prompt_self_attention_runs_once_per_forward_for_all_layers(tiny_clip, kernel_device):
    # What the batching is for: S's block runs once per training forward (for the vision PMS and the text
    # prompts alike) instead of once per prompted layer. On the grouped kernels' device (see above).
    clip = copy.deepcopy(tiny_clip).to(kernel_device)
    counts = []
    for grouped in (False, True):
        model = fastprompt.build("mcpl", clip, NAMES)
        model.use_grouped_maps = grouped
        calls = []
        model.method.attention.block.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
        images, labels = torch.randn(2, 3, 32, 32, device=kernel_device), torch.tensor([0, 2], device=kernel_device)
        loss, _ = model.loss(model(images), labels)
        loss.backward()
        counts.append(calls)
    per_layer, batched = counts
    assert len(per_layer) == 9 and all(shape[0] == 1 for shape in per_layer)
    assert len(batched) == 1 and batched[0][0] == 9
