"""Real peers for the DICOM integration tests: Orthanc (Debian) in a loopback-only netns.

Debian's Orthanc listens on all interfaces, so when the tests run as root each test runs
inside a private network namespace that has only ``lo``:

* a session fixture starts a holder process ``unshare --net sh -c 'ip link set lo up; sleep'``;
* the function fixture ``netns`` moves the pytest thread into that namespace with setns(2)
  for the duration of one test and back afterwards. Orthanc, sender threads and
  ``recon-server`` subprocesses started during the test inherit the namespace, so everything
  (DICOM, TLS, REST) talks over the namespace's loopback and nothing is reachable from outside.

Without root (or where unshare is not permitted) the tests still run on 127.0.0.1 with free
ports, and a warning says so. Free ports come from binding port 0 inside the namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

CLONE_NEWNET = 0x40000000
PACS_AET = "TESTPACS"
OUR_AET = "RECONSRV"


# ---- network namespace ---------------------------------------------------------------------


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@pytest.fixture(scope="session")
def netns_holder() -> Iterator[str | None]:
    """Path of a loopback-only network namespace (``/proc/<pid>/ns/net``), or None."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        warnings.warn(
            "not root: Orthanc runs without a private network namespace (loopback ports only)",
            pytest.PytestWarning,
            stacklevel=1,
        )
        yield None
        return
    holder = subprocess.Popen(
        ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo ready && exec sleep 100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    line = holder.stdout.readline().strip()
    if line != "ready":
        holder.kill()
        err = holder.communicate()[1]
        warnings.warn(
            f"cannot create a network namespace ({err.strip()}); Orthanc runs on loopback ports only",
            pytest.PytestWarning,
            stacklevel=1,
        )
        yield None
        return
    try:
        yield f"/proc/{holder.pid}/ns/net"
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def netns(netns_holder: str | None) -> Iterator[str | None]:
    """Run the test (and every process/thread it starts) inside the loopback-only namespace."""
    if netns_holder is None:
        yield None
        return
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns_holder, os.O_RDONLY)
    try:
        _setns(target)
        yield netns_holder
    finally:
        _setns(original)
        os.close(original)
        os.close(target)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition()`` until it returns a truthy value; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---- Orthanc ---------------------------------------------------------------------------------


class Orthanc:
    """One Orthanc process with AE-title checks on; REST helpers for reading images back."""

    def __init__(self, workdir: Path, *, dicom_port: int | None = None, **overrides: object) -> None:
        self.workdir = workdir
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.config: dict[str, object] = {
            "Name": "TEST-PACS",
            "StorageDirectory": str(workdir / "db"),
            "IndexDirectory": str(workdir / "db"),
            "Plugins": [],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": PACS_AET,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {"recon": [OUR_AET, "127.0.0.1", 11113]},
            "StableAge": 1,
        }
        self.config.update(overrides)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> Orthanc:
        exe = shutil.which("Orthanc")
        if exe is None:
            pytest.fail("Orthanc not found: install the Debian package orthanc (make deps)")
        logdir = self.workdir / "log"
        logdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config, indent=1))
        self.process = subprocess.Popen(
            [exe, f"--logdir={logdir}", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"Orthanc exited with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError):
                return bool(self.get("/system"))
            return False

        wait_for(up, timeout, "Orthanc REST API")
        return self

    def stop(self) -> None:
        # SIGKILL: a graceful Orthanc shutdown takes seconds and its test database is discarded
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        logs = sorted((self.workdir / "log").glob("*"), key=lambda p: p.stat().st_mtime)
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:]) if logs else "(no log)"

    def _request(self, path: str, data: bytes | None = None) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.read()

    def get(self, path: str):
        return json.loads(self._request(path))

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def lookup(self, sop_uid: str) -> str | None:
        hits = json.loads(self._request("/tools/lookup", sop_uid.encode()))
        ids = [h["ID"] for h in hits if h.get("Type") == "Instance"]
        return ids[0] if ids else None

    def file(self, instance_id: str) -> bytes:
        return self._request(f"/instances/{instance_id}/file")

    def sop_uids(self) -> list[str]:
        return [self.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in self.instances()]


@pytest.fixture
def orthanc_factory(tmp_path: Path, netns: str | None) -> Iterator:
    """orthanc_factory(start=True, **config overrides) -> Orthanc; all stopped at teardown."""
    servers: list[Orthanc] = []

    def make(start: bool = True, dicom_port: int | None = None, **overrides: object) -> Orthanc:
        server = Orthanc(tmp_path / f"orthanc{len(servers)}", dicom_port=dicom_port, **overrides)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def orthanc(orthanc_factory) -> Orthanc:
    """A running Orthanc with AE-title checks on, knowing calling AE ``RECONSRV``."""
    return orthanc_factory()


# ---- TLS test PKI -----------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.fail("openssl not found (Debian package openssl)")
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=recon-server test CA", cwd=d)  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="session")
def poll():
    """poll(condition, timeout, what): wait until condition() is truthy (fails on timeout)."""
    return wait_for


@pytest.fixture
def dicom_config(tmp_path: Path):
    """dicom_config(orthanc_or_port, **destination/config overrides) -> DicomConfig (fast retry)."""
    from recon_server.dicom.config import DicomConfig, PacsDestination, RetryPolicy

    def make(target: Orthanc | int, *, tls=None, calling_ae: str = OUR_AET, called_ae: str = PACS_AET, **kw):
        port = target.dicom_port if isinstance(target, Orthanc) else target
        dest = PacsDestination("orthanc", "127.0.0.1", port, called_ae, calling_ae, tls)
        settings = {
            "retry": RetryPolicy(initial_s=0.05, max_s=0.4, abort_limit=3),
            "connect_timeout_s": 5.0,
            "dimse_timeout_s": 10.0,
            "poll_interval_s": 0.1,
        }
        settings.update(kw)
        return DicomConfig(tmp_path / "out", tmp_path / "spool", destinations=(dest,), **settings)

    return make
