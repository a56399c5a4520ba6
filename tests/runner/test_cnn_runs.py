"""The runner on a CNN vision tower (the RN50-shaped tiny backbone): CoOp trains, evaluates and predicts through the
CLI as on a ViT, a Dassl CoOp checkpoint imports onto it (CoOp's RN50 runs), and a method that prompts vision is
refused from the backbone's config (in a dry run too) before any data are read or any folder is made."""

from __future__ import annotations

import os

import torch
from PIL import Image

from fastprompt.runner import Predictor
from runner_support import PROCEDURAL, read_json

RN = ["backbone=tiny-rn50", "pretrained=none", "device=cpu", "num_workers=0", "precision=fp32"]


def test_coop_trains_evaluates_and_predicts_on_a_cnn(tmp_path, cli):
    run = tmp_path / "run"
    code, out, err = cli("train", "--method", "coop", "--protocol", "fewshot", *PROCEDURAL, "--shots", 2, "--seeds", 1,
                         *RN, "epochs=2", "batch_size=4", "n_ctx=4", f"output_dir={run}")
    assert code == 0, err
    assert "backbone tiny-rn50" in out
    assert read_json(run / "seed1" / "results.json")["targets"]
    code, out, err = cli("eval", "--run", run)  # the saved prompts, evaluated again, give the logged accuracy
    assert code == 0, err
    assert "largest difference from the accuracy logged at training time: 0.0000 points" in out

    picture = tmp_path / "one.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(picture)
    code, out, err = cli("predict", run / "seed1", picture, "--top", 2)
    assert code == 0, err
    assert out.startswith(f"{picture}: ") and out.count("%") == 2

    program = tmp_path / "coop.pt2"  # the exported program runs the CNN as evaluation does (BatchNorm frozen)
    code, _, err = cli("export", run / "seed1", "--output", program)
    assert code == 0, err
    x = torch.randn(3, 3, 64, 64)
    model = Predictor(str(run / "seed1")).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(program)).module()(x), model(x).logits["main"])


def test_a_vision_prompt_method_is_refused_before_any_data(tmp_path, cli):
    run = tmp_path / "run"
    code, out, err = cli("train", "--method", "maple", "--dataset", "eurosat", "--root", tmp_path / "absent", *RN,
                         f"output_dir={run}")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "backbone 'tiny-rn50': method 'maple' puts prompts into the vision tower" in lines[0]
    assert "absent" not in err and not run.exists()
    code, out, dry = cli("train", "--method", "maple", "--dataset", "eurosat", "--root", tmp_path / "absent", *RN,
                         "--dry-run")
    assert code == 2 and dry == err


def test_ivlp_without_vision_prompts_is_accepted_there(tmp_path, cli):
    code, out, err = cli("train", "--method", "ivlp", "--protocol", "fewshot", *PROCEDURAL, "--shots", 1, "--seeds", 1,
                         *RN, "n_vision=0", "epochs=0", f"output_dir={tmp_path / 'run'}")
    assert code == 0, err


def test_a_dassl_coop_context_imports_onto_the_cnn(tmp_path, cli):
    from test_dassl_import import CLASSES, write_dassl

    ctx = torch.randn(16, 64).half()  # the tiny-rn50 text width; PREC fp16 as the trainer saves it
    source = write_dassl(tmp_path / "model.pth.tar-50", {"ctx": ctx})
    names = tmp_path / "classnames.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    output = tmp_path / "imported"
    code, _, err = cli("import-dassl", source, "--method", "coop", "--classnames", names, "--output", output,
                       "--backbone", "tiny-rn50")
    assert code == 0, err
    predictor = Predictor(str(output))
    torch.testing.assert_close(predictor.model.method.state_dict()["text_sources.1.tokens"], ctx.float(), rtol=0,
                               atol=0)
    probabilities = predictor(torch.randn(2, 3, 64, 64))
    assert probabilities.shape == (2, len(CLASSES)) and torch.allclose(probabilities.sum(-1), torch.ones(2))
    assert os.path.isfile(output / "checkpoint.json")
