"""Class-name files (`predict --classnames`, `import-dassl --classnames`): one name per line in label order, and
CoOp's ImageNet classnames.txt ('<wnid> <name>' lines) read as its names."""

import pytest

from fastprompt.data import DatasetError
from fastprompt.data.files import read_classnames


@pytest.mark.parametrize("text, names", [
    ("cat\n\ndog\n  red panda  \n", ["cat", "dog", "red panda"]),
    ("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n", ["tench", "goldfish", "great white shark"]),
    # Not every line is '<wnid> <name>': the lines are names as written.
    ("n01440764 tench\ngoldfish\n", ["n01440764 tench", "goldfish"]),
    ("n123 short id\nn01443537 goldfish\n", ["n123 short id", "n01443537 goldfish"]),
])
def test_names_in_label_order(tmp_path, text, names):
    path = tmp_path / "names.txt"
    path.write_text(text)
    assert read_classnames(str(path)) == names


def test_a_missing_or_empty_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match=f"^class-name file not found: {tmp_path / 'absent.txt'}$"):
        read_classnames(str(tmp_path / "absent.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DatasetError, match="holds no names$"):
        read_classnames(str(tmp_path / "empty.txt"))
