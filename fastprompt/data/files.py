"""Small file-system helpers shared by the loaders and the layout check."""

from __future__ import annotations

import os
import re

from .splits import DatasetError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_subdirs(folder: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `folder`."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def list_images(folder: str) -> list[str]:
    """Sorted names of the image files directly in `folder`.

    Sorted, unlike Dassl (which keeps os.listdir order): file order decides which images few-shot
    sampling picks from folder-based layouts, and listdir order differs between file systems.
    """
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file() and is_image_name(e.name))


def shorten(names, limit: int = 10) -> str:
    """'a, b, c, ... (N more)' for error messages."""
    names = list(names)
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def require_dir(path: str, what: str, hint: str) -> None:
    if not os.path.isdir(path):
        raise DatasetError(f"{what} not found: {path} is not a folder; {hint}")


def require_file(path: str, what: str, hint: str) -> None:
    if not os.path.isfile(path):
        raise DatasetError(f"{what} not found: {path} does not exist; {hint}")


def read_user_text(path: str, what: str, error: type[Exception] = DatasetError) -> str:
    """The text of a file a user wrote (class names, a CSV, a mapping, a config): UTF-8, with or without the
    byte-order mark that Windows editors and Excel's "CSV UTF-8" put first (dropped: kept, it would become part
    of the first name or column). Another encoding is one `error` naming the file and line: guessing one (cp1252,
    latin-1) would turn a name into other letters without a word."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as problem:
        line = data[: problem.start].count(b"\n") + 1
        raise error(
            f"{path}, line {line}: the {what} is not UTF-8 text (byte 0x{data[problem.start]:02x}); "
            "save it as UTF-8"
        ) from None


_WNID_LINE = re.compile(r"^n\d{8}\s+(\S.*)$")


def read_classnames(path: str) -> list[str]:
    """A class-name file: one name per line in label order; blank lines and lines that start with '#' are
    skipped. A file whose every line is '<wnid> <name>' (CoOp's ImageNet classnames.txt) gives the names."""
    if not os.path.isfile(path):
        raise DatasetError(f"class-name file not found: {path}")
    stripped = (line.strip() for line in read_user_text(path, "class-name file").splitlines())
    lines = [line for line in stripped if line and not line.startswith("#")]
    if not lines:
        raise DatasetError(f"class-name file {path} holds no names")
    matches = [_WNID_LINE.match(line) for line in lines]
    if all(matches):
        return [match.group(1) for match in matches]
    return lines
