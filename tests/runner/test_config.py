"""Typed configs, presets and overrides: the papers' numbers (METHODS.md §3) come out of the presets, values
are parsed by type and never evaluated, unknown keys name themselves and the closest valid key, and
--dry-run prints the effective config with its preset diff and writes nothing."""

import json
import os

import pytest

import fastprompt
from fastprompt.runner.config import ConfigError, RunConfig, load_config_file, resolve_config


def resolved(**overrides):
    return resolve_config(overrides={k: str(v) for k, v in overrides.items()}).config


@pytest.mark.parametrize("protocol", ["b2n", "fewshot", "xd", "dg"])
@pytest.mark.parametrize("method", sorted(fastprompt.METHODS))
def test_every_method_and_protocol_has_a_preset_the_method_accepts(method, protocol):
    dataset = "imagenet" if protocol in ("xd", "dg") else "dtd"
    config = resolved(method=method, protocol=protocol, dataset=dataset)
    assert set(config.options) <= set(fastprompt.method_options(method))
    assert config.backbone == "ViT-B-16" and config.pretrained == "openai"
    assert config.weight_decay == 5e-4 and config.momentum == 0.9 and config.warmup_lr == 1e-5


def test_maple_presets_follow_its_configs():
    b2n = resolved(method="maple", protocol="b2n", dataset="eurosat")
    assert (b2n.optimizer, b2n.lr, b2n.batch_size, b2n.epochs, b2n.options["depth"]) == ("sgd", 0.0035, 4, 5, 9)
    for protocol in ("xd", "dg"):
        xd = resolved(method="maple", protocol=protocol, dataset="imagenet")
        assert (xd.lr, xd.epochs, xd.options["depth"], xd.batch_size) == (0.0026, 2, 3, 4)


@pytest.mark.parametrize("shots,epochs", [(1, 50), (2, 100), (4, 100), (8, 200), (16, 200)])
def test_coop_few_shot_epochs_depend_on_shots(shots, epochs):
    config = resolved(method="coop", protocol="fewshot", dataset="dtd", shots=shots)
    assert (config.epochs, config.batch_size, config.lr, config.options["n_ctx"]) == (epochs, 32, 0.002, 16)
    assert resolved(method="coop", protocol="fewshot", dataset="imagenet", shots=shots).epochs == 50
    b2n = resolved(method="coop", protocol="b2n", dataset="dtd")
    assert (b2n.epochs, b2n.options["ctx_init"]) == (200, "a photo of a")


def test_mmrl_presets_per_dataset_and_protocol():
    euro = resolved(method="mmrl", protocol="b2n", dataset="eurosat")
    assert (euro.optimizer, euro.lr, euro.batch_size, euro.epochs) == ("adamw", 1e-3, 4, 10)
    assert euro.options == {"rep_dim": 2048, "reg_weight": 0.01} and euro.crop_scale == (0.5, 1.0)
    cars = resolved(method="mmrl", protocol="b2n", dataset="stanford_cars")
    assert cars.options == {"reg_weight": 7.0}
    imagenet = resolved(method="mmrl", protocol="b2n", dataset="imagenet")
    assert (imagenet.batch_size, imagenet.epochs, imagenet.options["reg_weight"]) == (32, 5, 0.5)
    xd = resolved(method="mmrl", protocol="xd", dataset="imagenet")
    assert (xd.batch_size, xd.epochs, xd.warmup_epochs, xd.options["reg_weight"]) == (32, 1, 0, 0.2)
    few = resolved(method="mmrl", protocol="fewshot", dataset="dtd")
    assert (few.batch_size, few.epochs, few.options["reg_weight"]) == (32, 50, 6.0)


def test_promptsrc_gpa_settings_per_protocol_and_dataset():
    b2n = resolved(method="promptsrc", protocol="b2n", dataset="dtd")
    assert b2n.gpa and (b2n.epochs, b2n.options["gpa_mean"], b2n.options["gpa_std"], b2n.lr) == (20, 15.0, 1.0, 0.0025)
    xd = resolved(method="promptsrc", protocol="xd", dataset="imagenet")
    assert (xd.epochs, xd.options["depth"], xd.options["gpa_mean"], xd.options["gpa_std"]) == (20, 3, 6.0, 10.0)
    pets = resolved(method="promptsrc", protocol="fewshot", dataset="oxford_pets")
    dtd = resolved(method="promptsrc", protocol="fewshot", dataset="dtd")
    assert (pets.epochs, pets.options["gpa_mean"], pets.options["gpa_std"]) == (50, 30.0, 30.0)
    assert (dtd.options["gpa_mean"], dtd.options["gpa_std"]) == (45.0, 5.0)


def test_cocoop_trains_with_batch_one():
    config = resolved(method="cocoop", protocol="b2n", dataset="dtd")
    assert (config.batch_size, config.epochs, config.lr) == (1, 10, 0.002)


def test_values_are_parsed_by_type_and_options_by_the_method_signature():
    config = resolved(method="coop", seeds="1,2", crop_scale="0.5,1", data_on_device="true", device_cache_side="96",
                      pretrained="none", n_ctx="8", ctx_init="none", lr="1e-3")
    assert config.seeds == (1, 2) and config.crop_scale == (0.5, 1.0) and config.data_on_device is True
    assert config.device_cache_side == 96 and config.pretrained is None and config.lr == 0.001
    assert config.options["n_ctx"] == 8 and config.options["ctx_init"] is None
    with pytest.raises(ConfigError, match="lr: expected a number"):
        resolved(lr="fast")
    with pytest.raises(ConfigError, match="crop_scale: expected 2 values"):
        resolved(crop_scale="0.5")


def test_unknown_keys_name_the_key_and_suggest_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'lrr'; did you mean 'lr'\?"):
        resolved(lrr="0.1")
    with pytest.raises(ConfigError, match=r"'depht'; did you mean 'depth'\?"):
        resolved(method="maple", depht="3")
    with pytest.raises(ConfigError, match=r"unknown method 'mapel'; did you mean 'maple'\? Valid methods: clip, "):
        resolved(method="mapel")
    with pytest.raises(ConfigError, match="unknown dataset 'eurosatt'"):
        resolved(dataset="eurosatt")


def test_invalid_combinations_are_errors():
    with pytest.raises(ConfigError, match="warmup_epochs=2 leaves no cosine epoch"):
        resolved(method="coop", epochs="2", warmup_epochs="2")
    with pytest.raises(ConfigError, match="gpa .* is PromptSRC's"):
        resolved(method="maple", gpa="true")
    with pytest.raises(ConfigError, match="targets are for the xd and dg protocols"):
        resolved(method="coop", targets="dtd")
    with pytest.raises(ConfigError, match="data_on_device is false"):
        resolved(device_cache_side="64", data_on_device="false")
    with pytest.raises(ConfigError, match="data_on_device must be true, false or auto, got 'gpu'"):
        resolved(data_on_device="gpu")
    assert resolved().data_on_device == "auto"  # on with CUDA, a DataLoader elsewhere


def test_config_files_are_data_json_and_yaml(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"method": "maple", "lr": 0.01, "options": {"depth": 3}, "seeds": [4]}))
    config = resolve_config(load_config_file(str(path)), {"lr": "0.02"}).config
    assert (config.method, config.lr, config.options["depth"], config.seeds) == ("maple", 0.02, 3, (4,))
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("method: coop\nepochs: 7\n")
    assert resolve_config(load_config_file(str(yaml_path))).config.epochs == 7
    # A YAML tag that would build a Python object is refused: files are parsed with safe_load only.
    evil = tmp_path / "evil.yaml"
    evil.write_text("method: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(str(evil))
    # A syntax error is one line with its place (PyYAML's own message draws a caret over several lines).
    unclosed = tmp_path / "unclosed.yaml"
    unclosed.write_text("epochs: 2\nseeds: [1, 2\n")
    with pytest.raises(ConfigError) as error:
        load_config_file(str(unclosed))
    assert str(error.value) == (f"config file {unclosed} is not valid YAML at line 3, column 1: expected ',' or ']',"
                                " but got '<stream end>'")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_file(str(broken))


@pytest.mark.parametrize("name, text", [("run.json", '{"method": "coop",\r\n "epochs": 7}'),
                                         ("run.yaml", "method: coop\r\nepochs: 7\r\n")])
def test_config_files_saved_by_windows_editors(tmp_path, name, text):
    # A byte-order mark first (Notepad, VS Code's "UTF-8 with BOM"): json.loads refuses one, so it is dropped.
    path = tmp_path / name
    path.write_bytes(("\ufeff" + text).encode("utf-8"))
    assert resolve_config(load_config_file(str(path))).config.epochs == 7
    # Saved in Windows' own code page: refused with the line, not read with other letters.
    path.write_bytes(text.replace("7", '7, "lr": "é"' if name.endswith("json") else "7  # é").encode("cp1252"))
    with pytest.raises(ConfigError, match=rf"^{path}, line 2: the config file is not UTF-8 text \(byte 0xe9\)"):
        load_config_file(str(path))


def test_round_trip_through_a_dict():
    config = resolved(method="mmrl", dataset="eurosat", seeds="1,2")
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_dry_run_prints_effective_config_and_diff_and_writes_nothing(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("train", "--method", "maple", "--dataset", "eurosat", "--root", tmp_path, "--dry-run",
                         "lr=0.01", "n_ctx=4")
    assert code == 0, err
    assert "lr = 0.01" in out and "depth = 9" in out and "ctx_init = \"a photo of a\"  # method default" in out
    assert "lr: 0.0035 -> 0.01" in out and "n_ctx: null -> 4" in out
    assert os.listdir(tmp_path) == []


def test_dry_run_shows_the_context_length_ctx_init_gives(tmp_path, cli, monkeypatch):
    # CoOp's b2n preset sets ctx_init="a photo of a", which fixes the context at its 4 tokens: the dry run must
    # not print the unused default n_ctx=16 as if it were trained with
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("train", "--method", "coop", "--dataset", "eurosat", "--root", tmp_path, "--dry-run")
    assert code == 0, err
    assert "n_ctx = 4  # ctx_init's token count (the method's default, 16, is not used)" in out.splitlines()
    code, out, err = cli("train", "--method", "coop", "--protocol", "fewshot", "--dataset", "eurosat", "--root",
                         tmp_path, "--dry-run")
    assert code == 0, err
    assert "n_ctx = 16" in out.splitlines() and "ctx_init = null" in out.splitlines()


def test_conflicting_flags_are_errors(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("train", "--method", "coop", "method=maple", "--dry-run")
    assert code == 2 and "conflicting values for method: --method coop and method=maple" in err
    code, _, err = cli("train", "--method", "coop", "--dry-run", "--resume", "latest")
    assert code == 2 and "--dry-run and --resume conflict" in err
    code, _, err = cli("train", "lr=0.1", "lr=0.2", "--dry-run")
    assert code == 2 and "given twice" in err
    code, _, err = cli("eval", "--run", tmp_path, "--checkpoint", tmp_path)
    assert code == 2 and "exactly one of --run" in err
    code, _, err = cli("train", "--dry-run", "stray")
    assert code == 2 and "override 'stray' is not key=value" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value, message", [
    ("kernels=trition", "kernels must be one of auto, triton, xformers, sdpa, eager, got 'trition' (did you mean 'triton'?)"),
    ("device=tpu", "device='tpu': the runner runs on auto, cpu, cuda or cuda:N"),
    ("device=cuda:first", "device='cuda:first': the runner runs on"),
    ("dataset.num_tset_per_class=2", "dataset 'procedural' has no option 'num_tset_per_class'; did you mean"
                                     " 'dataset.num_test_per_class'? its options: num_train_per_class,"),
    ("dataset.colour=red", "dataset 'procedural' has no option 'colour'; its options:"),
    ("dataset.num_test_per_class=abc", "dataset.num_test_per_class: expected an integer, got 'abc'"),
])
def test_dry_run_refuses_what_the_run_would_refuse(tmp_path, cli, monkeypatch, value, message):
    """The names and types a run checks only when it starts (after the backbone loads) are checked by a dry run too:
    kernels, the device's spelling and the dataset's options."""
    monkeypatch.chdir(tmp_path)
    for dry in (["--dry-run"], ["backbone=tiny", "pretrained=none", "output_dir=run"]):
        code, out, err = cli("train", "--method", "coop", "--dataset", "procedural", value, *dry)
        assert code == 2 and err.count("\n") == 1 and message in err, (out, err)
    assert os.listdir(tmp_path) == []


def test_dataset_options_take_their_declared_types(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("train", "--method", "coop", "--dataset", "imagefolder", "--root", tmp_path, "--dry-run",
                         "dataset.val_fraction=0.25", "dataset.split_seed=3", "dataset.template=a {} photo.")
    assert code == 0, err
    assert "dataset.val_fraction: null -> 0.25" in out and "dataset.split_seed: null -> 3" in out
    assert 'dataset.template: null -> "a {} photo."' in out


def test_data_on_device_auto_means_on_with_cuda_only():
    from fastprompt.runner.config import data_on_device

    auto = resolved()
    assert data_on_device(auto, "cuda") and data_on_device(auto, "cuda:1")
    assert not data_on_device(auto, "cpu")
    assert data_on_device(resolved(data_on_device="on"), "cpu") is True
    assert data_on_device(resolved(data_on_device="false"), "cuda") is False
