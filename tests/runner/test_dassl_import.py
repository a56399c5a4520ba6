"""`fastprompt import-dassl`: checkpoints of the official Dassl trainers become fastprompt checkpoints.

Each test writes a synthetic Dassl file with the key names and shapes the official trainer saves (read from
the trainer files cited in fastprompt/runner/dassl_import.py), at the tiny backbone's widths (text, vision and
embedding 64, 12 layers per tower, patch 8 at 32 px), random values, and a scheduler state holding its
successor scheduler object as Dassl's warm-up scheduler does. The imported folder is loaded with Predictor,
and every parameter is compared with the source tensor under the correspondence written out here from the
papers' method descriptions (METHODS.md §3), not taken from the importer's table.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastprompt.runner import Predictor

CLASSES = ["cat", "dog", "red panda"]
D = 64  # tiny text width = vision width = embed dim


def write_dassl(path, state, epoch=5, scheduler_object=True):
    """torch.save a dict shaped like Dassl's save_checkpoint output (state_dict, epoch, optimizer, scheduler)."""
    weights = [torch.nn.Parameter(torch.randn(2, 3))]
    optimizer = torch.optim.SGD(weights, lr=0.002, momentum=0.9)
    weights[0].grad = torch.ones(2, 3)
    optimizer.step()  # momentum buffers: the optimizer state holds a defaultdict of tensors
    scheduler = {"warmup_epoch": 1, "cons_lr": 1e-5, "last_epoch": epoch}
    if scheduler_object:
        scheduler["successor"] = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10.0)
    torch.save({"state_dict": state, "epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler,
                "val_result": None}, path)
    return str(path)


def frozen_clip(prefix_buffers="prompt_learner."):
    """A few of the frozen CLIP entries a whole-model trainer saves, plus the class buffers it deletes itself."""
    return {"image_encoder.conv1.weight": torch.randn(D, 3, 8, 8),
            "image_encoder.positional_embedding": torch.randn(17, D),
            "image_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * D, D),
            "text_encoder.positional_embedding": torch.randn(77, D), "logit_scale": torch.tensor(4.6),
            f"{prefix_buffers}token_prefix": torch.randn(3, 1, D),
            f"{prefix_buffers}token_suffix": torch.randn(3, 72, D)}


@pytest.fixture
def run_import(tmp_path, cli):
    """Write `state` as a Dassl file, import it; returns (exit code, stderr, output folder)."""

    def run(method, state, *extra, backbone="tiny", file_name="model.pth.tar-5", **kwargs):
        names = tmp_path / "classnames.txt"
        names.write_text("\n".join(CLASSES) + "\n")
        source = write_dassl(tmp_path / file_name, state, **kwargs) if state is not None else tmp_path / file_name
        output = tmp_path / f"imported-{method}"
        args = ["import-dassl", source, "--method", method, "--classnames", names, "--output", output]
        code, _, err = cli(*args, *(["--backbone", backbone] if backbone else []), *extra)
        return code, err, output

    return run


def imported(output, expected: dict):
    """Load the folder with Predictor and check every parameter against its expected source tensor."""
    predictor = Predictor(str(output))
    params = predictor.model.method.state_dict()
    assert set(params) == set(expected)
    for name, source in expected.items():
        assert params[name].dtype == torch.float32, name
        torch.testing.assert_close(params[name], source.float(), rtol=0, atol=0, msg=name)
    assert predictor.classnames == CLASSES
    probs = predictor(torch.randn(2, 3, 32, 32))
    assert probs.shape == (2, len(CLASSES)) and torch.isfinite(probs).all()
    with open(os.path.join(output, "checkpoint.json")) as handle:
        return json.load(handle)


def test_coop_generic_context_fp16_becomes_fp32(run_import):
    ctx = torch.randn(16, D).half()  # PREC fp16: the trainer's context is half
    state = {"ctx": ctx, "token_prefix": torch.randn(3, 1, D), "token_suffix": torch.randn(3, 60, D)}
    code, err, output = run_import("coop", state)
    assert code == 0, err
    manifest = imported(output, {"text_sources.1.tokens": ctx})
    assert manifest["options"]["n_ctx"] == 16 and manifest["options"]["class_specific"] is False
    assert manifest["imported_from"]["epoch"] == 5
    assert manifest["imported_from"]["file"].endswith("model.pth.tar-5")
    assert manifest["classnames"] == CLASSES and manifest["backbone"]["name"] == "tiny"


def test_imported_checkpoint_evaluates_with_the_cli(run_import, cli):
    code, err, output = run_import("coop", {"ctx": torch.randn(16, D)})
    assert code == 0, err
    code, out, err = cli("eval", "--checkpoint", output, "--dataset", "procedural", "device=cpu", "num_workers=0",
                         "dataset.num_test_per_class=2")
    assert code == 0, err
    assert "procedural" in out and "accuracy" in out


def test_cli_choices_are_the_importers():
    from fastprompt.cli import DASSL_IMPORTABLE
    from fastprompt.methods import METHODS
    from fastprompt.runner.dassl_import import IMPORTABLE, _LAYOUTS

    assert DASSL_IMPORTABLE == IMPORTABLE and set(IMPORTABLE) == set(_LAYOUTS) and set(IMPORTABLE) <= set(METHODS)


def test_coop_class_specific_context_keeps_the_class_order(run_import):
    ctx = torch.randn(3, 8, D)  # CSC: one context per class, row i for class i
    code, err, output = run_import("coop", {"ctx": ctx})
    assert code == 0, err
    manifest = imported(output, {"text_sources.1.tokens": ctx})
    assert manifest["options"]["class_specific"] is True and manifest["options"]["n_ctx"] == 8


def test_cocoop_context_and_meta_net(run_import):
    # meta-net Linear(embed -> embed // 16) -> ReLU -> Linear(-> text width), as METHODS.md §3.2.
    state = {"ctx": torch.randn(4, D), "meta_net.linear1.weight": torch.randn(4, D), "meta_net.linear1.bias":
             torch.randn(4), "meta_net.linear2.weight": torch.randn(D, 4), "meta_net.linear2.bias": torch.randn(D),
             "token_prefix": torch.randn(3, 1, D), "token_suffix": torch.randn(3, 72, D)}
    code, err, output = run_import("cocoop", state)
    assert code == 0, err
    imported(output, {"text_sources.1.base.tokens": state["ctx"],
                      "text_sources.1.net.0.weight": state["meta_net.linear1.weight"],
                      "text_sources.1.net.0.bias": state["meta_net.linear1.bias"],
                      "text_sources.1.net.2.weight": state["meta_net.linear2.weight"],
                      "text_sources.1.net.2.bias": state["meta_net.linear2.bias"]})


def maple_state(depth=9, n=2):
    state = {"prompt_learner.ctx": torch.randn(n, D).half(), "prompt_learner.proj.weight": torch.randn(D, D).half(),
             "prompt_learner.proj.bias": torch.randn(D).half(), **frozen_clip()}
    for i in range(depth - 1):
        state[f"prompt_learner.compound_prompts_text.{i}"] = torch.randn(n, D)
        state[f"prompt_learner.compound_prompt_projections.{i}.weight"] = torch.randn(D, D)
        state[f"prompt_learner.compound_prompt_projections.{i}.bias"] = torch.randn(D)
    return state


def test_maple_prompts_and_couplings(run_import):
    state = maple_state()
    code, err, output = run_import("maple", state)
    assert code == 0, err
    # Layer 1: text ctx and its coupling F_1 (proj); layers 2..9: P_l and F_l; the vision side reads P_l.
    expected = {"text_sources.1.tokens": state["prompt_learner.ctx"],
                "vision_sources.1.source.tokens": state["prompt_learner.ctx"],
                "vision_sources.1.mapping.weight": state["prompt_learner.proj.weight"],
                "vision_sources.1.mapping.bias": state["prompt_learner.proj.bias"]}
    for layer in range(2, 10):
        prompt = state[f"prompt_learner.compound_prompts_text.{layer - 2}"]
        expected[f"text_sources.{layer}.tokens"] = prompt
        expected[f"vision_sources.{layer}.source.tokens"] = prompt
        for part in ("weight", "bias"):
            expected[f"vision_sources.{layer}.mapping.{part}"] = \
                state[f"prompt_learner.compound_prompt_projections.{layer - 2}.{part}"]
    manifest = imported(output, expected)
    assert (manifest["options"]["n_ctx"], manifest["options"]["depth"]) == (2, 9)
    assert manifest["options"]["ctx_init"] == "a photo of a"


def ivlp_state(n_text=2, text_depth=9, n_vision=3, vision_depth=12, buffers="prompt_learner."):
    state = {"prompt_learner.ctx": torch.randn(n_text, D), "image_encoder.VPT": torch.randn(n_vision, D),
             **frozen_clip(buffers)}
    for i in range(1, text_depth):
        state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_text, D)
    for i in range(1, vision_depth):
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_vision, D)
    return state


def ivlp_expected(state, text_depth, vision_depth):
    """Layer 1 of each tower from the prompt learner / VPT, layer l >= 2 from resblocks.(l-1).VPT_shallow."""
    expected = {"text_sources.1.tokens": state["prompt_learner.ctx"]} if text_depth else {}
    expected["vision_sources.1.tokens"] = state["image_encoder.VPT"]
    expected.update({f"text_sources.{l}.tokens": state[f"text_encoder.transformer.resblocks.{l - 1}.VPT_shallow"]
                     for l in range(2, text_depth + 1)})
    expected.update({f"vision_sources.{l}.tokens": state[f"image_encoder.transformer.resblocks.{l - 1}.VPT_shallow"]
                     for l in range(2, vision_depth + 1)})
    return expected


def test_ivlp_towers_of_different_shapes(run_import):
    state = ivlp_state()
    code, err, output = run_import("ivlp", state)
    assert code == 0, err
    manifest = imported(output, ivlp_expected(state, 9, 12))
    o = manifest["options"]
    assert (o["n_text"], o["text_depth"], o["n_vision"], o["vision_depth"]) == (2, 9, 3, 12)


def test_vpt_deep_vision_prompts(run_import):
    state = {k: v for k, v in ivlp_state(n_vision=8).items() if not k.startswith(("prompt_learner", "text_encoder.t"))}
    code, err, output = run_import("vpt_deep", state)
    assert code == 0, err
    manifest = imported(output, ivlp_expected(state, 0, 12))
    assert manifest["options"]["template"] == "a photo of a {}."


def test_promptsrc_drops_its_frozen_teacher(run_import):
    state = ivlp_state(4, 9, 4, 9)
    state["prompt_learner.ZS_image_encoder.conv1.weight"] = torch.randn(D, 3, 8, 8)
    code, err, output = run_import("promptsrc", state)
    assert code == 0, err
    manifest = imported(output, ivlp_expected(state, 9, 9))
    assert (manifest["options"]["n_ctx"], manifest["options"]["depth"]) == (4, 9)


def test_mmrl_shared_tokens_maps_and_rep_head(run_import):
    rep_dim, layers = 32, range(6, 13)  # REP_LAYERS [6..12]: seven maps per tower
    latent = "representation_learner.compound_rep_tokens"
    state = {latent: torch.randn(5, rep_dim), "image_encoder.proj_rep": torch.randn(D, D),
             "prompt_embeddings": torch.randn(3, 77, D), **frozen_clip("")}
    for j in range(len(layers)):
        for tower in "tv":
            state[f"{latent}_r2{tower}proj.{j}.weight"] = torch.randn(D, rep_dim)
            state[f"{latent}_r2{tower}proj.{j}.bias"] = torch.randn(D)
    code, err, output = run_import("mmrl", state, "--option", "template=a centered satellite photo of {}.")
    assert code == 0, err
    expected = {"proj_rep": state["image_encoder.proj_rep"]}
    for j, layer in enumerate(layers):
        for ours, tower in (("text_sources", "t"), ("vision_sources", "v")):
            expected[f"{ours}.{layer}.source.tokens"] = state[latent]
            expected[f"{ours}.{layer}.mapping.weight"] = state[f"{latent}_r2{tower}proj.{j}.weight"]
            expected[f"{ours}.{layer}.mapping.bias"] = state[f"{latent}_r2{tower}proj.{j}.bias"]
    o = imported(output, expected)["options"]
    assert (o["n_tokens"], o["rep_dim"], o["first_layer"], o["fusion"]) == (5, 32, 6, "logits")
    assert o["template"] == "a centered satellite photo of {}."


# --- bad input: exit 2, one line, no output folder ---------------------------------------------------------
def refused(result, *words):
    code, err, output = result
    assert code == 2 and err.startswith("fastprompt: error:") and err.count("\n") == 1, err
    assert not os.path.exists(output)
    for word in words:
        assert word in err, err


def test_missing_key(run_import):
    state = maple_state()
    del state["prompt_learner.compound_prompts_text.3"]
    refused(run_import("maple", state), "missing", "compound_prompts_text.3")


def test_shape_mismatch(run_import):
    state = maple_state()
    state["prompt_learner.ctx"] = torch.randn(2, 32)
    refused(run_import("maple", state), "prompt_learner.ctx (2, 32)")


def test_wrong_method(run_import):
    refused(run_import("maple", {"ctx": torch.randn(16, D)}), "prompt_learner.ctx")


def test_unknown_learned_key_is_not_dropped(run_import):
    state = maple_state()
    state["image_encoder.transformer.resblocks.3.VPT_shallow"] = torch.randn(2, D)
    refused(run_import("maple", state), "unknown", "resblocks.3.VPT_shallow")


def test_a_missing_or_foreign_file_is_reported_before_the_backbone_question(run_import, tmp_path):
    # CoOp without --backbone: the file's own problem comes first (it was "name --backbone" for a missing file).
    refused(run_import("coop", None, backbone=None, file_name="absent.pth.tar"), "Dassl checkpoint not found")
    (tmp_path / "notes.txt").write_text("epoch 5\n")
    refused(run_import("coop", None, backbone=None, file_name="notes.txt"), "not a torch checkpoint")


def test_not_a_checkpoint(run_import, tmp_path):
    (tmp_path / "notes.txt").write_text("epoch 5, accuracy 90\n")
    refused(run_import("coop", None, file_name="notes.txt"), "not a torch checkpoint")


class Untrusted:
    """A class a weights-only load must not construct."""


def test_pickle_that_weights_only_refuses(run_import, tmp_path):
    path = tmp_path / "model.pth.tar-1"
    torch.save({"state_dict": {"ctx": torch.randn(16, D)}, "epoch": 1, "extra": Untrusted()}, path)
    refused(run_import("coop", None, file_name="model.pth.tar-1"), "weights-only", "Untrusted")


def test_other_refusals(run_import):
    refused(run_import("coop", {"ctx": torch.randn(16, D)}, backbone=None), "--backbone")
    refused(run_import("promptsrc", ivlp_state()), "--method ivlp")
    state = maple_state()
    state["image_encoder.conv1.weight"] = torch.randn(D, 3, 16, 16)  # a /16 patch embedding: not this backbone
    refused(run_import("maple", state), "image_encoder.conv1.weight")
    refused(run_import("coop", {"ctx": torch.randn(16, D)}, "--option", "n_ctx=4"), "n_ctx")
    # tiny-l14: 24 vision, 12 text layers; the trainer's one REP_LAYERS list cannot mean our per-tower J..L
    latent = "representation_learner.compound_rep_tokens"
    refused(run_import("mmrl", {latent: torch.randn(5, 32)}, backbone="tiny-l14"), "equal depth")


def test_an_existing_output_is_never_overwritten(run_import, tmp_path):
    existing = tmp_path / "imported-coop"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, err, _ = run_import("coop", {"ctx": torch.randn(16, D)})
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert sorted(os.listdir(existing)) == ["keep.txt"]
