"""Class-name files (`predict --classnames`, `import-dassl --classnames`): one name per line in label order, '#'
lines skipped, UTF-8 with or without a byte-order mark, and CoOp's ImageNet classnames.txt ('<wnid> <name>'
lines) read as its names."""

import pytest

from fastprompt.data import DatasetError
from fastprompt.data.files import read_classnames


@pytest.mark.parametrize("text, names", [
    ("cat\n\ndog\n  red panda  \n", ["cat", "dog", "red panda"]),
    ("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n", ["tench", "goldfish", "great white shark"]),
    # Not every line is '<wnid> <name>': the lines are names as written.
    ("n01440764 tench\ngoldfish\n", ["n01440764 tench", "goldfish"]),
    ("n123 short id\nn01443537 goldfish\n", ["n123 short id", "n01443537 goldfish"]),
    # Comment lines, as a user annotates a list; a '#' inside a name is part of it.
    ("# fruit, in label order\napple\n  # pears come next\npear #2\n", ["apple", "pear #2"]),
    ("# ImageNet\nn01440764 tench\nn01443537 goldfish\n", ["tench", "goldfish"]),
    # Saved by a Windows editor: a byte-order mark first and CRLF line ends.
    ("\ufeffcrème brûlée\r\ndog\r\n", ["crème brûlée", "dog"]),
    ("\ufeffn01440764 tench\r\nn01443537 goldfish\r\n", ["tench", "goldfish"]),
])
def test_names_in_label_order(tmp_path, text, names):
    path = tmp_path / "names.txt"
    path.write_bytes(text.encode("utf-8"))
    assert read_classnames(str(path)) == names


def test_a_missing_or_empty_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match=f"^class-name file not found: {tmp_path / 'absent.txt'}$"):
        read_classnames(str(tmp_path / "absent.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DatasetError, match="holds no names$"):
        read_classnames(str(tmp_path / "empty.txt"))


def test_a_file_in_another_encoding_is_refused_with_its_line(tmp_path):
    path = tmp_path / "names.txt"
    path.write_bytes("cat\ndog\ncrème brûlée\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"names.txt, line 3: the class-name file is not UTF-8 text \(byte 0xe8\)"):
        read_classnames(str(path))
