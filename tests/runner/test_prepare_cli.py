"""`fastprompt prepare --download` fetches through fastprompt.data.download_dataset, then checks the layout;
without --download it only checks (and reports what is missing)."""

import fastprompt.data
from runner_support import build_eurosat


def test_prepare_download_fetches_then_checks(tmp_path, cli, monkeypatch):
    calls = []

    def fake_download(name, root):
        # Stands in for the network: lays out the dataset as the real archives unpack it.
        calls.append((name, root))
        build_eurosat(tmp_path / "data")
        return [str(tmp_path / "data" / "downloads" / "EuroSAT.zip")]

    monkeypatch.setattr(fastprompt.data, "download_dataset", fake_download)
    code, out, err = cli("prepare", "eurosat", "--root", tmp_path / "data", "--download", "--verify", "all")
    assert code == 0, out + err
    assert calls == [("eurosat", str(tmp_path / "data"))]
    assert "downloaded and unpacked 1 archive(s)" in out


def test_prepare_without_download_reports_the_missing_layout(tmp_path, cli):
    code, out, err = cli("prepare", "eurosat", "--root", tmp_path)
    assert code == 1
    assert "eurosat" in out.lower()
