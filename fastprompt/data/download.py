"""Resumable, checksum-verified downloads of the benchmarks that have a stable public archive.

`download_dataset(name, root)` fetches and unpacks the archives of one dataset into the CoOp layout;
the CoOp split files (`split_zhou_*.json`) are on Google Drive only and still have to be placed by
hand (check_layout says so). A download writes `<file>.part`, resumes it with an HTTP Range request
after an interruption (a server that ignores Range is handled by starting again), verifies the MD5
recorded below and only then renames the file into place. URLs and MD5s are those torchvision's
dataset classes use; FGVCAircraft has no published checksum and is fetched unverified with a warning.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

from .layouts import resolve_dataset_name
from .splits import DatasetError

logger = logging.getLogger(__name__)


class ChecksumError(OSError):
    """A downloaded file does not have the recorded checksum."""


@dataclass(frozen=True)
class Archive:
    """One file to fetch. extract_to is relative to the root ("" = root itself); strip is an archive
    member prefix to drop while extracting; archives named in then_extract (relative to the root)
    come out of this one and are unpacked in place too."""

    url: str
    md5: str | None
    extract_to: str
    strip: str = ""
    then_extract: tuple[str, ...] = ()
    extract: bool = True

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


_VGG = "https://www.robots.ox.ac.uk/~vgg/data"
DOWNLOADS: dict[str, tuple[Archive, ...]] = {
    "caltech101": (
        Archive(
            "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
            "3138e1922a9193bfa496528edbbc45d0",
            "",
            then_extract=("caltech-101/101_ObjectCategories.tar.gz",),
        ),
    ),
    "dtd": (Archive(f"{_VGG}/dtd/download/dtd-r1.0.1.tar.gz", "fff73e5086ae6bdbea199a49dfb8a4c1", ""),),
    "food101": (Archive("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "85eeb15f3717b99a5da872d97d918f87", ""),),
    "oxford_flowers": (
        Archive(f"{_VGG}/flowers/102/102flowers.tgz", "52808999861908f626f3c1f4e79d11fa", "oxford_flowers"),
        Archive(
            f"{_VGG}/flowers/102/imagelabels.mat", "e0620be6f572b9609742df49c70aed4d", "oxford_flowers", extract=False
        ),
    ),
    "oxford_pets": (
        Archive(f"{_VGG}/pets/data/images.tar.gz", "5c4f3ee8e5d25df40f4fd59a7f44e54c", "oxford_pets"),
        Archive(f"{_VGG}/pets/data/annotations.tar.gz", "95a8c909bbe2e81eed6a22bccdf3f68f", "oxford_pets"),
    ),
    "eurosat": (
        Archive(
            "https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
            "c8fa014336c82ac7804f0398fcb19387",
            "eurosat",
        ),
    ),
    "sun397": (
        Archive(
            "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz", "8ca2778205c41d23104230ba66911c7a", "sun397"
        ),
    ),
    "fgvc_aircraft": (
        Archive(
            f"{_VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
            None,
            "fgvc_aircraft",
            strip="fgvc-aircraft-2013b/data/",
        ),
    ),
}


def file_md5(path: str, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: str, md5: str | None, url: str) -> None:
    if md5 is None:
        return
    actual = file_md5(path)
    if actual != md5:
        raise ChecksumError(f"{path} (from {url}) has MD5 {actual}, expected {md5}")


def download_file(
    url: str,
    destination: str,
    md5: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
    backoff_s: float = 1.0,
) -> str:
    """Download `url` to `destination`, resuming `<destination>.part` across interruptions.

    An existing destination with the right checksum is kept (no request). A finished download
    with the wrong checksum is deleted and raises ChecksumError. Network errors are retried up to
    `retries` times in a row (an attempt that added bytes resets the count), each retry resuming
    where the last one stopped after `backoff_s` * 2**(failures - 1) seconds.
    """
    if os.path.isfile(destination):
        _verify(destination, md5, url)
        return destination
    os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
    partial = destination + ".part"
    failures = 0
    while True:
        offset = start_size = os.path.getsize(partial) if os.path.isfile(partial) else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if offset and response.status != 206:
                    offset = 0  # the server ignored the Range header: start again
                elif offset and not (response.headers.get("Content-Range") or "").startswith(f"bytes {offset}-"):
                    raise DatasetError(
                        f"download of {url}: the server resumed at the wrong place "
                        f"(Content-Range {response.headers.get('Content-Range')!r}, asked for byte {offset}); "
                        f"delete {partial} and retry"
                    )
                expected = response.headers.get("Content-Length")
                expected = offset + int(expected) if expected is not None else None
                with open(partial, "ab" if offset else "wb") as handle:
                    for chunk in iter(lambda: response.read(chunk_size), b""):
                        handle.write(chunk)
            size = os.path.getsize(partial)
            if expected is not None and size < expected:
                raise http.client.IncompleteRead(b"", expected - size)
            break
        except urllib.error.HTTPError as error:
            if error.code == 416 and offset:  # nothing left to send: the part file is complete
                break
            raise DatasetError(f"download of {url} failed: HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
            held = os.path.getsize(partial) if os.path.isfile(partial) else 0
            failures = 1 if held > start_size else failures + 1
            if failures > retries:
                # A machine without network access (a cluster's compute node) never gets a byte: the file can come
                # from elsewhere, and a file at the destination is checked and used without a request.
                then = (f"rerun to resume from byte {held:,}" if held else
                        f"if this machine cannot reach it, download it elsewhere and put it at {destination}"
                        + (" (its md5 is checked)" if md5 else ""))
                raise DatasetError(f"download of {url} failed after {retries} retries: {error}; {then}") from None
            where = f" from byte {held:,}" if held else ""
            logger.warning("download of %s interrupted (%s); retry %d of %d%s", url, error, failures, retries, where)
            time.sleep(backoff_s * 2 ** (failures - 1))
    try:
        _verify(partial, md5, url)
    except ChecksumError:
        os.remove(partial)
        raise
    os.replace(partial, destination)
    return destination


def _safe_target(destination: str, member: str, strip: str) -> str | None:
    """Where an archive member goes, or None if it lies outside the stripped prefix."""
    name = member.replace("\\", "/")
    if strip:
        if not name.startswith(strip):
            return None
        name = name[len(strip) :]
    if not name.strip("/"):
        return None
    target = os.path.realpath(os.path.join(destination, name))
    if os.path.isabs(name) or not target.startswith(os.path.realpath(destination) + os.sep):
        raise DatasetError(f"archive member {member!r} would be written outside {destination}; refusing to extract")
    return target


def extract_archive(archive: str, destination: str, strip: str = "") -> None:
    """Unpack a .tar(.gz/.tgz) or .zip into destination, refusing members that escape it and links."""
    os.makedirs(destination, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                target = _safe_target(destination, info.filename, strip)
                if target is None or info.is_dir():
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with bundle.open(info) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
        return
    if not tarfile.is_tarfile(archive):
        raise DatasetError(f"{archive} is neither a tar nor a zip archive")
    with tarfile.open(archive) as bundle:
        for member in bundle:
            target = _safe_target(destination, member.name, strip)
            if target is None or member.isdir():
                continue
            if not member.isfile():
                raise DatasetError(f"archive {archive} holds a link or device {member.name!r}; refusing to extract")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with bundle.extractfile(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)


def download_dataset(
    name: str, root: str, keep_archives: bool = True, sources: Sequence[Archive] | None = None
) -> list[str]:
    """Fetch and unpack `name` into `root` (CoOp layout). Returns the archive paths.

    Archives go to `<root>/downloads/`; each unpacked archive leaves a `.extracted` marker so that
    a rerun resumes where it stopped instead of unpacking again. `sources` replaces the recorded
    archives (a mirror, or a local server in tests); their checksums are the caller's to give.
    """
    canonical = resolve_dataset_name(name)
    if sources is None and canonical not in DOWNLOADS:
        raise DatasetError(
            f"{canonical!r} has no stable public download (known: {', '.join(DOWNLOADS)}); "
            "place its files by hand in the layout check_layout describes"
        )
    root = os.path.abspath(os.path.expanduser(root))
    archives = []
    for item in sources if sources is not None else DOWNLOADS[canonical]:
        archive = os.path.join(root, "downloads", item.filename)
        marker = archive + ".extracted"
        archives.append(archive)
        if os.path.isfile(marker):
            continue  # fetched and unpacked by an earlier run
        if item.md5 is None:
            logger.warning("%s has no published checksum; the download cannot be verified", item.url)
        download_file(item.url, archive, item.md5)
        target = os.path.join(root, item.extract_to)
        if item.extract:
            extract_archive(archive, target, item.strip)
            for inner in item.then_extract:
                inner_path = os.path.join(root, inner)
                extract_archive(inner_path, os.path.dirname(inner_path))
        else:
            os.makedirs(target, exist_ok=True)
            shutil.copyfile(archive, os.path.join(target, item.filename))
        with open(marker, "w") as handle:
            handle.write(target + "\n")
        if not keep_archives:
            os.remove(archive)
    return archives
