"""Resumable, checksum-verified downloads against a local HTTP server on 127.0.0.1 (no network).

The server supports Range requests, can cut the first response short, or ignore Range; it runs in a
daemon thread and a watchdog shuts it down after 60 s whatever happens to the test.
"""

import hashlib
import io
import os
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from fastprompt.data import DatasetError, check_layout
from fastprompt.data.download import Archive, ChecksumError, download_dataset, download_file, extract_archive

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        server = self.server
        body = server.files.get(self.path)
        server.requests.append((self.path, self.headers.get("Range")))
        if body is None:
            self.send_error(404)
            return
        start, status = 0, 200
        range_header = self.headers.get("Range")
        if range_header and server.honour_range:
            start = int(range_header.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start:]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if server.cut_first_after is not None and (server.cut_every_time or not server.cut_done):
            server.cut_done = True
            self.wfile.write(payload[: server.cut_first_after])
            self.wfile.flush()
            self.close_connection = True
            return
        server.bytes_sent += len(payload)
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(monkeypatch):
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.files, server.requests = {}, []
    server.honour_range, server.cut_first_after, server.cut_done, server.bytes_sent = True, None, False, 0
    server.cut_every_time = False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(60, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    watchdog.cancel()
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_plain_download_is_verified_and_renamed(file_server, tmp_path):
    server, base = file_server
    server.files["/blob.bin"] = PAYLOAD
    path = download_file(f"{base}/blob.bin", str(tmp_path / "blob.bin"), md5=PAYLOAD_MD5)
    with open(path, "rb") as handle:
        assert handle.read() == PAYLOAD
    assert not os.path.exists(path + ".part")
    download_file(f"{base}/blob.bin", path, md5=PAYLOAD_MD5)  # present and correct: no request
    assert len(server.requests) == 1


def test_existing_part_file_is_resumed_with_a_range_request(file_server, tmp_path):
    server, base = file_server
    server.files["/blob.bin"] = PAYLOAD
    destination = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD[:40000])
    download_file(f"{base}/blob.bin", str(destination), md5=PAYLOAD_MD5)
    assert destination.read_bytes() == PAYLOAD
    assert server.requests == [("/blob.bin", "bytes=40000-")]
    assert server.bytes_sent == len(PAYLOAD) - 40000


def test_interrupted_transfer_resumes_where_it_stopped(file_server, tmp_path):
    server, base = file_server
    server.files["/blob.bin"] = PAYLOAD
    server.cut_first_after = 30000
    download_file(f"{base}/blob.bin", str(tmp_path / "blob.bin"), md5=PAYLOAD_MD5, backoff_s=0)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD
    assert server.requests == [("/blob.bin", None), ("/blob.bin", "bytes=30000-")]


def test_retries_are_bounded_when_no_progress_is_made(file_server, tmp_path):
    server, base = file_server
    server.files["/blob.bin"] = PAYLOAD
    server.honour_range, server.cut_first_after = False, 10000
    server.cut_every_time = True  # every response stops at the same byte: no attempt gets further
    with pytest.raises(DatasetError, match="failed after 2 retries.*; rerun to resume from byte 10,000$"):
        download_file(f"{base}/blob.bin", str(tmp_path / "blob.bin"), retries=2, backoff_s=0)
    assert len(server.requests) == 3


def test_an_unreachable_server_says_where_the_file_can_be_put(tmp_path, caplog):
    # A port on which nothing listens: the connection is refused, as a machine without network access is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    destination = tmp_path / "EuroSAT.zip"
    with pytest.raises(DatasetError) as error:
        download_file(f"http://127.0.0.1:{port}/EuroSAT.zip", str(destination), md5=PAYLOAD_MD5, retries=2,
                      backoff_s=0)
    assert str(error.value).startswith(f"download of http://127.0.0.1:{port}/EuroSAT.zip failed after 2 retries: ")
    assert str(error.value).endswith(f"; if this machine cannot reach it, download it elsewhere and put it at "
                                     f"{destination} (its md5 is checked)")
    assert [record.getMessage().rpartition(";")[2] for record in caplog.records] == [" retry 1 of 2", " retry 2 of 2"]
    # Put there, it is checked and used without a request.
    destination.write_bytes(PAYLOAD)
    assert download_file(f"http://127.0.0.1:{port}/EuroSAT.zip", str(destination), md5=PAYLOAD_MD5) == str(destination)


def test_server_ignoring_range_restarts_from_zero(file_server, tmp_path):
    server, base = file_server
    server.files["/blob.bin"] = PAYLOAD
    server.honour_range = False
    (tmp_path / "blob.bin.part").write_bytes(b"stale bytes that must not stay in front")
    download_file(f"{base}/blob.bin", str(tmp_path / "blob.bin"), md5=PAYLOAD_MD5)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD


def test_complete_part_file_gets_416_and_is_kept(file_server, tmp_path):
    server, base = file_server
    server.files["/blob.bin"] = PAYLOAD
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD)
    download_file(f"{base}/blob.bin", str(tmp_path / "blob.bin"), md5=PAYLOAD_MD5)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD and server.bytes_sent == 0


def test_wrong_checksum_is_reported_and_the_part_removed(file_server, tmp_path):
    server, base = file_server
    server.files["/blob.bin"] = PAYLOAD
    with pytest.raises(ChecksumError, match=f"has MD5 {PAYLOAD_MD5}, expected 0+"):
        download_file(f"{base}/blob.bin", str(tmp_path / "blob.bin"), md5="0" * 32)
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()
    with pytest.raises(DatasetError, match="HTTP 404"):
        download_file(f"{base}/absent.bin", str(tmp_path / "absent.bin"))


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_download_dataset_unpacks_into_the_coop_layout(file_server, tmp_path):
    server, base = file_server
    image = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(image, format="JPEG")
    archive = _tar_gz(
        {
            "fgvc-aircraft-2013b/data/images/0034309.jpg": image.getvalue(),
            "fgvc-aircraft-2013b/data/variants.txt": b"707-320\n",
            "fgvc-aircraft-2013b/README.html": b"not data",
        }
    )
    server.files["/fgvc.tar.gz"] = archive
    sources = [
        Archive(
            f"{base}/fgvc.tar.gz", hashlib.md5(archive).hexdigest(), "fgvc_aircraft", strip="fgvc-aircraft-2013b/data/"
        )
    ]
    download_dataset("fgvc_aircraft", str(tmp_path), sources=sources)
    assert (tmp_path / "fgvc_aircraft/images/0034309.jpg").is_file()
    assert (tmp_path / "fgvc_aircraft/variants.txt").read_text() == "707-320\n"
    assert not (tmp_path / "fgvc_aircraft/README.html").exists()
    download_dataset("fgvc_aircraft", str(tmp_path), sources=sources)  # marker: no second fetch
    assert len(server.requests) == 1
    report = check_layout("fgvc_aircraft", tmp_path)
    assert any("images_variant_train.txt" in p for p in report.problems)
    # Fetched on another machine and put where the error of an unreachable server says: unpacked, no request.
    other = tmp_path / "offline"
    (other / "downloads").mkdir(parents=True)
    (other / "downloads" / "fgvc.tar.gz").write_bytes(archive)
    download_dataset("fgvc_aircraft", str(other), sources=sources)
    assert (other / "fgvc_aircraft/images/0034309.jpg").is_file() and len(server.requests) == 1


def test_extraction_refuses_members_outside_the_destination(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    evil.write_bytes(_tar_gz({"../outside.txt": b"x"}))
    with pytest.raises(DatasetError, match="outside"):
        extract_archive(str(evil), str(tmp_path / "dest"))
    assert not (tmp_path / "outside.txt").exists()
    zipped = tmp_path / "ok.zip"
    with zipfile.ZipFile(zipped, "w") as bundle:
        bundle.writestr("2750/Forest/Forest_1.jpg", b"jpeg bytes")
    extract_archive(str(zipped), str(tmp_path / "eurosat"))
    assert (tmp_path / "eurosat/2750/Forest/Forest_1.jpg").read_bytes() == b"jpeg bytes"


def test_datasets_without_public_archive_say_so(tmp_path):
    with pytest.raises(DatasetError, match="no stable public download"):
        download_dataset("imagenet", str(tmp_path))
