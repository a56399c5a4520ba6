"""Method options with a fixed set of values (a method class's `option_choices`) are checked with the config,
before a run folder exists or any data is read, not first when the model is built."""

import os

import pytest

from fastprompt.methods import METHODS, method_options
from runner_support import FAST


@pytest.mark.parametrize("method, value, message", [
    ("mmrl", "fusion=bogus", "fusion must be one of logits, probs, got 'bogus' (an option of method mmrl)"),
    ("mmrl", "towers=all", "towers must be one of both, vision, text, got 'all'"),
    ("mudpt", "injection=attention", "injection must be one of cross_attention, linear, self_attention"),
    ("mcpl", "pms=huge", "pms must be one of standard, large, xlarge, none, got 'huge'"),
])
def test_a_bad_choice_fails_before_the_run_starts(tmp_path, cli, method, value, message):
    # The dataset root does not exist: had the data been read first, that would be the error.
    out = tmp_path / "run"
    code, stdout, err = cli("train", "--method", method, "--protocol", "b2n", "--dataset", "eurosat", "--root",
                            tmp_path / "nowhere", "--seeds", "1", *FAST, value, f"output_dir={out}")
    assert code == 2, (stdout, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastprompt: error: ") and message in lines[0], err
    assert not os.path.exists(out), "a failed start must leave no run folder"


def test_a_bad_choice_in_a_config_file_fails_the_dry_run(tmp_path, cli):
    config = tmp_path / "config.json"
    config.write_text('{"options": {"regularizer": "l2"}}')
    code, _, err = cli("train", "--method", "mmrl", "--dataset", "procedural", "--config", config, "--dry-run")
    assert code == 2 and "regularizer must be one of cosine, l1, mse, got 'l2'" in err, err


@pytest.mark.parametrize("name", sorted(METHODS))
def test_choice_tables_name_real_options_and_hold_the_defaults(name):
    defaults = method_options(name)
    for option, allowed in METHODS[name].option_choices.items():
        assert option in defaults, f"{name}.option_choices names {option!r}, not an option of the method"
        assert defaults[option] in allowed, f"{name}'s default {option}={defaults[option]!r} is not in {allowed}"


def test_the_methods_with_string_choices_declare_them():
    assert {name for name, cls in METHODS.items() if cls.option_choices} == {"mmrl", "mudpt", "mcpl"}
