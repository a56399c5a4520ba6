"""MPL's options against the paper (METHODS.md §3.5; Modular Prompt Learning, Sec. IV): the schedules it
describes build, add = remove is deep VPT, remove = 0 with depth 1 is shallow VPT, and the layer-1 maps."""

import pytest
import torch

import fastprompt

NAMES = ["red circle", "blue square", "green triangle"]


def images64(n=2):
    return torch.randn(n, 3, 32, 32, dtype=torch.float64)


def vpt_with_mpl_tokens(clip, mpl, n_vision, depth):
    """VPT-deep whose free block of each layer holds what MPL's maps produce there."""
    vpt = fastprompt.build("vpt_deep", clip, NAMES, n_vision=n_vision, vision_depth=depth).double()
    with torch.no_grad():
        for layer in range(1, depth + 1):
            vpt.method.vision_sources[str(layer)].tokens.copy_(mpl.method.vision_sources[str(layer)](None))
    return vpt


@pytest.mark.parametrize("n", [2, 3])
def test_add_equal_remove_is_deep_vpt(tiny_clip64, n):
    """Paper: "When [add = remove], it is the same as the traditional deep visual prompt"."""
    mpl = fastprompt.build("mpl", tiny_clip64, NAMES, n_add=n, n_remove=n).double()
    vpt = vpt_with_mpl_tokens(tiny_clip64, mpl, n, 9)
    assert mpl.method.vision_schedule.edits == vpt.method.vision_schedule.edits
    imgs = images64()
    torch.testing.assert_close(mpl(imgs).image_features, vpt(imgs).image_features, rtol=1e-10, atol=1e-10)


def test_remove_zero_depth_one_is_shallow_vpt(tiny_clip64):
    """Paper: "When [remove = 0] and the prompt depth is 1, it becomes the traditional shallow visual prompt"."""
    mpl = fastprompt.build("mpl", tiny_clip64, NAMES, n_remove=0, depth=1).double()
    vpt = vpt_with_mpl_tokens(tiny_clip64, mpl, 2, 1)
    imgs = images64()
    torch.testing.assert_close(mpl(imgs).image_features, vpt(imgs).image_features, rtol=1e-10, atol=1e-10)


def test_layer_one_adds_n_add_tokens_from_maps_of_its_own(tiny_clip):
    """Paper: 2 image-encoder prompts "for each transformer layer"; layer 1's maps are fresh Linears (not copies
    of the G maps), the G maps of layers 2..9 start as copies of one Linear (released code)."""
    method = fastprompt.build("mpl", tiny_clip, NAMES).method
    assert method.vision_schedule.adds()[:9] == [2] * 9
    first = [p.mapping.weight for p in method.vision_sources["1"].parts]
    deep = [p.mapping.weight for l in range(2, 10) for p in method.vision_sources[str(l)].parts]
    assert len(first) == 2 and len(deep) == 16
    assert all(torch.equal(w, deep[0]) for w in deep)
    assert not torch.equal(first[0], first[1])
    assert not any(torch.equal(w, deep[0]) for w in first)
    released = fastprompt.build("mpl", tiny_clip, NAMES, n_first=1).method
    assert released.vision_schedule.adds()[:2] == [1, 2]
    assert len(released.vision_sources["1"].parts) == 1


def test_counts_are_groups_of_text_tokens(tiny_clip):
    """With n_ctx text tokens each map yields n_ctx vision tokens: 2 maps add 4, removing 1 group drops 2."""
    method = fastprompt.build("mpl", tiny_clip, NAMES, n_ctx=2).method
    assert method.vision_schedule.segment_lengths() == [2 * (l + 1) for l in range(1, 10)] + [20] * 3
    assert method.template == "X X a photo of a {}."


@pytest.mark.parametrize(
    "options,message",
    [
        ({"n_remove": 3}, "n_remove=3 must not exceed n_add=2"),
        ({"n_first": 1, "n_remove": 2, "n_add": 2}, "layer 1 added n_first=1"),
        ({"n_add": 0}, "n_add must be an int >= 1"),
        ({"depth": 13}, "depth=13 exceeds"),
        ({"n_first": 0}, "n_first must be an int >= 1"),
    ],
)
def test_bad_schedules_name_the_option(tiny_clip, options, message):
    with pytest.raises(ValueError, match=message):
        fastprompt.build("mpl", tiny_clip, NAMES, **options)


def test_options_listed_with_paper_defaults():
    assert fastprompt.method_options("mpl") == {"n_ctx": 1, "n_add": 2, "n_remove": 1, "depth": 9, "n_first": None}
