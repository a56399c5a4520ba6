"""`fastprompt report` over several folders: two runs of one method on one dataset (other settings) used to make
two rows of the same name that nothing told apart, and a folder given twice made its row twice."""

import json

from fastprompt.runner.results import summarize_run


def finished_run(folder, name, accuracy):
    """A run folder as `fastprompt train` leaves it, as far as report reads it: run.json and summary.json."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"status": "complete"}))
    seeds = [{"seed": 1, "targets": [
        {"dataset": "dtd", "subset": "base", "mode": "base", "accuracy": accuracy, "macro_f1": accuracy},
        {"dataset": "dtd", "subset": "novel", "mode": "novel", "accuracy": accuracy - 10, "macro_f1": accuracy},
    ]}]
    (folder / "summary.json").write_text(json.dumps(summarize_run("b2n", name, seeds)))
    return folder


def rows(out):
    return [line for line in out.splitlines() if line.startswith("| maple") or line.startswith("| coop")]


def test_runs_of_one_name_from_different_folders_carry_their_folder(tmp_path, cli):
    low = finished_run(tmp_path / "lr-low", "maple dtd", 70.0)
    high = finished_run(tmp_path / "sweeps" / "lr-high", "maple dtd", 80.0)
    other = finished_run(tmp_path / "coop-run", "coop dtd", 60.0)
    code, out, err = cli("report", low, high, other)
    assert code == 0, err
    assert rows(out) == ["| maple dtd [lr-low] | dtd | 1 | 70.00 ± 0.00 | 60.00 ± 0.00 | 64.62 |",
                         "| maple dtd [lr-high] | dtd | 1 | 80.00 ± 0.00 | 70.00 ± 0.00 | 74.67 |",
                         "| coop dtd | dtd | 1 | 60.00 ± 0.00 | 50.00 ± 0.00 | 54.55 |"]
    # same basename in two places: the folders as given
    again = finished_run(tmp_path / "sweeps" / "lr-low", "maple dtd", 75.0)
    code, out, err = cli("report", low, again)
    assert code == 0, err
    assert [row.split(" | ")[0] for row in rows(out)] == [f"| maple dtd [{low}]", f"| maple dtd [{again}]"]


def test_a_folder_given_twice_is_one_row_and_a_note(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    finished_run(tmp_path / "run", "maple dtd", 70.0)
    code, out, err = cli("report", "run", "./run/")
    assert code == 0, err
    assert rows(out) == ["| maple dtd | dtd | 1 | 70.00 ± 0.00 | 60.00 ± 0.00 | 64.62 |"]
    assert err == "fastprompt: note: ./run/ is run again; its rows are shown once\n"
