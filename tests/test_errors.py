"""Bad input gets a clear error that names the problem."""

import open_clip
import pytest
import torch

import fastprompt
from fastprompt.backbones import create_clip
from fastprompt.schedule import LayerEdit, ScheduleError, TowerSchedule


def test_unknown_method_lists_known(tiny_clip):
    with pytest.raises(KeyError, match="known methods: .*maple"):
        fastprompt.build("mapel", tiny_clip, ["cat"])


def test_unknown_method_option_names_it(tiny_clip):
    with pytest.raises(TypeError, match="no option.*'n_ctxx'.*n_ctx"):
        fastprompt.build("maple", tiny_clip, ["cat"], n_ctxx=3)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match="unknown backbone 'ViT-B-61'.*ViT-B-16"):
        create_clip("ViT-B-61")


def test_missing_pretrained_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        create_clip("ViT-B-16", pretrained=str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("backbone", ["tiny", "ViT-S-32-alt"])  # fastprompt's own config, open_clip's factory
def test_a_weights_file_of_another_kind_is_one_line(tmp_path, backbone):
    from fastprompt.backbones import WeightsFileError

    text = tmp_path / "notes.pt"
    text.write_text("not weights\n")
    with pytest.raises(WeightsFileError, match=r"^pretrained file '.*notes.pt' (is not a weights-only torch"
                                               r" checkpoint|does not load into)"):
        create_clip(backbone, pretrained=str(text))
    other = tmp_path / "small.pt"  # another architecture: hundreds of mismatched tensors, two named
    torch.save(create_clip("small").state_dict(), other)
    with pytest.raises(WeightsFileError) as error:
        create_clip(backbone, pretrained=str(other))
    message = str(error.value)
    assert message.startswith(f"pretrained file '{other}' does not load into {backbone}: ") and "\n" not in message
    if backbone == "tiny":  # fastprompt loads the state dict itself: the first mismatches and a count
        assert "size mismatch" in message and message.endswith("more)"), message
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(bytes(range(50)))
    with pytest.raises(WeightsFileError, match=r"^pretrained file '.*noise.safetensors' is not a safetensors file"):
        create_clip("tiny", pretrained=str(noise))


def test_the_demo_reports_weights_it_cannot_load_in_one_line(tmp_path, capsys):
    from fastprompt.cli import main

    bad = tmp_path / "bad.pt"
    bad.write_text("x\n")
    assert main(["demo", "--backbone", "tiny", "--pretrained", str(bad), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastprompt: error: pretrained file") and err.count("\n") == 1, err


def test_class_name_that_does_not_fit_is_named(tiny_clip):
    long_name = " ".join(["zebra"] * 80)
    with pytest.raises(ValueError, match="class 'zebra zebra.*does not fit.*77"):
        fastprompt.build("coop", tiny_clip, ["cat", long_name])


def test_class_name_that_fits_only_without_prompts_is_named(tiny_clip):
    # 60 words fit the plain template but not CoOp's 16 context slots in front of them.
    name = " ".join(["cat"] * 60)
    fastprompt.build("clip", tiny_clip, [name], template="{}")
    # 77 = SOS + 16 slots + the name + '.' + EOT: 58 name tokens fit. The name is shown once, cut.
    with pytest.raises(ValueError, match=r"^class 'cat cat .{49}\.\.\.' does not fit: .* is 79 tokens with SOS/EOT, "
                                         r"the text context holds 77; the name is 60 tokens, at most 58 fit$"):
        fastprompt.build("coop", tiny_clip, [name])


def test_empty_class_list(tiny_clip):
    with pytest.raises(ValueError, match="class list is empty"):
        fastprompt.build("maple", tiny_clip, [])


def test_blank_class_name(tiny_clip):
    with pytest.raises(ValueError, match="empty after cleaning"):
        fastprompt.build("maple", tiny_clip, ["cat", " _ "])


def test_schedule_drops_exceeding_the_segment():
    with pytest.raises(ScheduleError, match="vision layer 2: drops 3 tokens but the segment holds only 2"):
        TowerSchedule("vision", (LayerEdit(0, 2), LayerEdit(3, 1)))
    with pytest.raises(ScheduleError, match="layer 1: drops 1"):
        TowerSchedule("vision", (LayerEdit(1, 1),))


def test_schedule_text_replace_mode_keeps_length():
    with pytest.raises(ScheduleError, match="keeps the template length"):
        TowerSchedule("text", (LayerEdit(0, 2), LayerEdit(2, 3)))
    with pytest.raises(ScheduleError, match="non-negative int"):
        LayerEdit(-1, 0)


def test_schedule_with_wrong_depth_for_the_model(tiny_clip):
    model = fastprompt.build("maple", tiny_clip, ["cat"])
    with pytest.raises(ScheduleError, match="13 layers, the model's tower has 12"):
        TowerSchedule.none("vision", 13).check_layers(model.info.vision.layers)


def test_wrong_image_size_and_dtype(tiny_clip):
    model = fastprompt.build("maple", tiny_clip, ["cat", "dog"])
    with pytest.raises(ValueError, match=r"\(48, 48\) pixels but the model is for \(32, 32\)"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 32, 32))


def test_unsupported_models_are_refused(tiny_clip):
    with pytest.raises(fastprompt.UnsupportedModelError, match="TorchScript"):
        fastprompt.inspect_clip(torch.jit.script(create_clip("tiny")))
    custom = open_clip.CustomTextCLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )
    with pytest.raises(fastprompt.UnsupportedModelError, match="CustomTextCLIP"):
        fastprompt.inspect_clip(custom)
    qk = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )
    qk.visual.transformer.resblocks[1] = open_clip.transformer.CustomResidualAttentionBlock(64, 2)
    with pytest.raises(fastprompt.UnsupportedModelError, match=r"visual.transformer.resblocks\[1\] is a CustomResidual"):
        fastprompt.inspect_clip(qk)


@pytest.mark.parametrize("backbone", ["ViT-B-32", "ViT-L-14"])
def test_other_backbones_build_and_run(backbone):
    clip = create_clip(backbone)
    model = fastprompt.build("maple", clip, ["cat", "dog"])
    info = model.info
    assert (info.vision.width, info.text.width) == ({"ViT-B-32": 768, "ViT-L-14": 1024}[backbone],
                                                    {"ViT-B-32": 512, "ViT-L-14": 768}[backbone])
    coupling = model.method.vision_sources["1"].mapping
    assert (coupling.in_features, coupling.out_features) == (info.text.width, info.vision.width)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.logits["main"].shape == (1, 2)


def test_images_on_another_device_are_named(tiny_clip):
    model = fastprompt.build("maple", tiny_clip, ["cat", "dog"])
    with pytest.raises(ValueError, match="images are on meta but the model is on cpu"):
        model(torch.empty(1, 3, 32, 32, device="meta"))


def test_images_of_another_float_dtype_are_cast_to_the_model(tiny_clip):
    """Documented behaviour (as open_clip's encode_image): any floating dtype is cast to the weights' dtype."""
    model = fastprompt.build("maple", tiny_clip, ["cat", "dog"]).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images.double()).logits["main"], model(images).logits["main"])
