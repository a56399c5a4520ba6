"""`fastprompt predict CHECKPOINT IMAGES...`: the top classes of image files, checked against the model rebuilt by
hand from the checkpoint's safetensors file (unpatched, the evaluation transform applied here); and its refusals,
one line each, before any model loads."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import fastprompt
from fastprompt.backbones import create_clip
from fastprompt.data import eval_transform, open_rgb_image, procedural_splits
from fastprompt.fast import fast_path
from fastprompt.runner import Predictor
from runner_support import FAST, PROCEDURAL, read_json


def _reference_probabilities(seed_dir, names, files):
    manifest = read_json(seed_dir / "checkpoint.json")
    model = fastprompt.build(manifest["method"], create_clip("tiny"), manifest["classnames"], **manifest["options"])
    model.method.load_state_dict(load_file(str(seed_dir / "checkpoint.safetensors")), strict=False)
    model.set_classnames(names)
    model.eval()
    images = torch.stack([eval_transform(32)(open_rgb_image(f)) for f in files])
    with torch.no_grad():
        return model(images).logits["main"].softmax(-1)


def test_predict_prints_and_writes_the_top_classes_of_files_and_folders(tmp_path, cli):
    run = tmp_path / "run"
    code, _, err = cli("train", "--method", "maple", *PROCEDURAL, "--shots", 1, "--seeds", 1, *FAST, "epochs=2",
                       "batch_size=2", f"output_dir={run}")
    assert code == 0, err
    splits = procedural_splits(num_train_per_class=2, image_size=32)
    folder = tmp_path / "images"
    files = [folder / "b.png", folder / "nested" / "a.png", tmp_path / "single.png"]
    for path, sample in zip(files, (splits.train[0], splits.train[5], splits.train[9]), strict=True):
        os.makedirs(path.parent, exist_ok=True)
        splits.loader(sample.path).save(path)
    names = tmp_path / "names.txt"
    names.write_text("yellow star\nred circle\ncyan ring\n")  # a new class set: MaPLe's prompts do not depend on it
    output = tmp_path / "predictions.json"

    # The run folder (one seed) stands for its checkpoint; a folder gives its images in sorted order, recursively.
    code, out, err = cli("predict", run, folder, tmp_path / "single.png", "--classnames", names, "--top", 2,
                         "--device", "cpu", "--output", output)
    assert code == 0, err
    order = [folder / "b.png", folder / "nested" / "a.png", tmp_path / "single.png"]
    expected = _reference_probabilities(run / "seed1", ["yellow star", "red circle", "cyan ring"], order)
    written = json.loads(output.read_text())
    assert written["checkpoint"] == str(run / "seed1") and written["mode"] == "novel"
    lines = out.strip().splitlines()[:-1]  # the last line says where the JSON went
    assert len(lines) == len(written["predictions"]) == 3
    for line, row, reference in zip(lines, written["predictions"], expected, strict=True):
        values, indices = reference.topk(2)
        assert [t["class"] for t in row["top"]] == [written["classnames"][i] for i in indices.tolist()]
        assert [t["probability"] for t in row["top"]] == pytest.approx(values.tolist(), abs=1e-5)
        assert line == f"{row['image']}: " + ", ".join(f"{t['class']} {100 * t['probability']:.1f}%"
                                                       for t in row["top"])
    assert [row["image"] for row in written["predictions"]] == [str(p) for p in order]

    # Two names that prompt alike: one note line on stderr (Python's warning form quoted `sys.exit(main())`)
    names.write_text("red circle\nred_circle\ncyan ring\n")
    code, out, err = cli("predict", run, tmp_path / "single.png", "--classnames", names, "--device", "cpu")
    assert code == 0, err
    assert err.splitlines() == ["fastprompt: note: duplicate class names ('red circle' and 'red_circle', both 'red"
                                " circle' after cleaning at positions 0 and 1): their prompts are identical, so they"
                                " always score the same and the first wins ties"]

    # A file that does not decode costs only its own line: the rest are predicted and written, it is named on
    # stderr and in the JSON, and the exit status is 1 (the whole call used to fail, losing every prediction).
    (folder / "broken.png").write_bytes(b"not an image")
    code, out, err = cli("predict", run, folder, "--top", 1, "--device", "cpu", "--output", output)
    assert code == 1
    readable = [str(folder / "b.png"), str(folder / "nested" / "a.png")]
    assert [line.split(":")[0] for line in out.splitlines()[:-1]] == readable
    written = json.loads(output.read_text())
    assert [row["image"] for row in written["predictions"]] == readable
    assert [failure["image"] for failure in written["unreadable"]] == [str(folder / "broken.png")]
    assert err.splitlines() == [f"fastprompt: error: {written['unreadable'][0]['error']}",
                                "fastprompt: 1 of 3 images could not be decoded; the other 2 were predicted"]
    assert written["unreadable"][0]["error"].startswith(f"cannot decode image {folder / 'broken.png'}: ")

    # Python: the CLIP a Predictor creates runs the fast path unless kernels='eager'.
    assert fast_path(Predictor(str(run / "seed1"), device="cpu").model.clip) is not None
    assert fast_path(Predictor(str(run / "seed1"), device="cpu", kernels="eager").model.clip) is None


@pytest.mark.parametrize("args, message", [
    (["{ckpt}", "{tmp}/absent.png"], "image file not found: {tmp}/absent.png"),
    (["{ckpt}", "{tmp}/empty"], "no image files in folder {tmp}/empty"),
    (["{ckpt}", "{tmp}/x.png", "--top", "0"], "--top must be at least 1, got 0"),
    (["{ckpt}", "{tmp}/x.png", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["{tmp}/run", "{tmp}/x.png"], "{tmp}/run is a run folder of 2 seeds; give one of them: {tmp}/run/seed1,"
                                   " {tmp}/run/seed2"),
    (["{tmp}/nothing", "{tmp}/x.png"], "checkpoint not found: {tmp}/nothing"),
])
def test_predict_refusals_are_one_line(tmp_path, cli, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.png").write_bytes(b"")
    for seed in ("seed1", "seed2"):
        (tmp_path / "run" / seed).mkdir(parents=True)
        (tmp_path / "run" / seed / "checkpoint.json").write_text("{}")
    (tmp_path / "run" / "run.json").write_text("{}")
    fill = {"tmp": str(tmp_path), "ckpt": str(tmp_path / "run" / "seed1")}
    code, out, err = cli("predict", *[a.format(**fill) for a in args])
    assert code == 2 and err == f"fastprompt: error: {message.format(**fill)}\n", err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a CUDA device on a machine without one")
def test_predict_on_a_missing_gpu_is_one_line(tmp_path, cli):
    (tmp_path / "x.png").write_bytes(b"")
    code, _, err = cli("predict", tmp_path, tmp_path / "x.png", "--device", "cuda")
    assert code == 2 and "CUDA is not available on this machine" in err and err.count("\n") == 1


@pytest.mark.gpu
def test_predictor_on_a_gpu_runs_bf16_through_the_evaluation_engine(tmp_path):
    """device='auto' takes the GPU; the CLIP it creates has bf16 weights and the fast path; a batch shape seen again
    replays the EvalStep's CUDA graph, with the probabilities of the fp32 CPU predictor up to bf16 rounding."""
    from fastprompt.runner import checkpoint as ckpt

    donor = fastprompt.build("maple", create_clip("tiny"), ["red fox", "green frog", "blue jay"])
    with torch.no_grad():
        for parameter in donor.method.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ckpt.save_checkpoint(str(tmp_path), donor, "maple", {}, ckpt.backbone_record(donor, "tiny", None))
    predictor = Predictor(str(tmp_path))
    assert predictor.device.type == "cuda" and predictor.model.clip.visual.conv1.weight.dtype == torch.bfloat16
    assert fast_path(predictor.model.clip) is not None
    x = torch.randn(4, 3, 32, 32)
    calls = [predictor(x) for _ in range(3)]  # warm-up, capture, replay
    assert predictor._step.mode_name == "cuda_graph"
    assert torch.equal(calls[1], calls[2])
    reference = Predictor(str(tmp_path), device="cpu")(x)
    torch.testing.assert_close(calls[2], reference, rtol=0, atol=3e-2)
