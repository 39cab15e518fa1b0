"""Delivery to a real PACS (Debian Orthanc, AE-title checks on) in a loopback-only netns."""

from __future__ import annotations

import io
import signal
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from recon_server.dicom.config import TlsConfig
from recon_server.dicom.deliver import SenderWorker, store_series
from recon_server.dicom.sender import PacsSender, echo
from recon_server.dicom.spool import Spool


def test_images_arrive_pixel_identical(vol, orthanc, dicom_config):
    config = dicom_config(orthanc)
    assert echo(config.destinations[0], config).ok
    volume = vol.make_volume(oblique=True, rows=30, cols=32, fov_xy=(220.0, 165.0))
    paths = store_series(volume, config)
    spool = Spool(config.spool_dir)
    assert spool.pending_count("orthanc") == len(paths)  # spooled before any network traffic
    report = PacsSender(config, spool).drain(timeout_s=30)
    assert (report.stored, report.pending, report.quarantined) == (4, 0, 0)
    for path in paths:
        local = pydicom.dcmread(path)
        instance = orthanc.lookup(local.SOPInstanceUID)
        assert instance is not None, f"{local.SOPInstanceUID} not in Orthanc"
        remote = pydicom.dcmread(io.BytesIO(orthanc.file(instance)))
        assert remote.SeriesInstanceUID == local.SeriesInstanceUID
        assert remote.StudyInstanceUID == vol.STUDY_UID
        np.testing.assert_array_equal(remote.pixel_array, local.pixel_array)
        assert remote.ImagePositionPatient == local.ImagePositionPatient
    assert len(orthanc.instances()) == 4
    assert not any(config.spool_dir.glob("orthanc/pending/*/*.dcm"))


@pytest.mark.parametrize("always_allow_echo", [True, False], ids=["abort-at-store", "rejected-association"])
def test_wrong_calling_ae_is_a_permanent_failure(vol, orthanc_factory, dicom_config, always_allow_echo):
    orthanc = orthanc_factory(DicomAlwaysAllowEcho=always_allow_echo)
    config = dicom_config(orthanc, calling_ae="INTRUDER")
    store_series(vol.make_volume(n_slices=3), config)
    report = PacsSender(config).drain(timeout_s=20)
    assert (report.stored, report.quarantined, report.pending) == (0, 3, 0)
    reasons = {r["reason"] for _, r in Spool(config.spool_dir).quarantined("orthanc")}
    assert len(reasons) == 1
    (reason,) = reasons
    assert "'INTRUDER'" in reason, reason
    assert orthanc.instances() == []


def test_pacs_down_images_wait_in_spool_then_arrive(vol, orthanc_factory, dicom_config, poll):
    orthanc = orthanc_factory(start=False)  # ports reserved, nothing listening yet
    config = dicom_config(orthanc)
    worker = SenderWorker(config).start()
    try:
        paths = store_series(vol.make_volume(n_slices=4), config, worker=worker)
        spool = Spool(config.spool_dir)
        # the sender tries (connection refused), backs off, and keeps every image
        poll(lambda: worker.sender.state["orthanc"].failures >= 2, 10, "two failed attempts")
        assert "TCP connection failed" in worker.sender.state["orthanc"].last_error
        assert spool.pending_count("orthanc") == len(paths) == 4
        assert spool.quarantined("orthanc") == []
        orthanc.start()
        poll(lambda: len(orthanc.instances()) == 4, 15, "all images in Orthanc after it started")
        poll(lambda: spool.pending_count("orthanc") == 0, 5, "an empty spool")
    finally:
        worker.stop()
    want = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in paths)
    assert sorted(orthanc.sop_uids()) == want


def test_sender_killed_mid_series_delivers_each_image_once(vol, orthanc, dicom_config, poll, tmp_path):
    config = dicom_config(orthanc)
    paths = store_series(vol.make_volume(n_slices=8), config)
    want = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in paths)
    dest = config.destinations[0]
    cmd = [
        sys.executable, "-m", "recon_server.cli", "--log-level", "WARNING", "spool-drain",
        "--spool-dir", str(config.spool_dir), "--name", dest.name, "--host", dest.host,
        "--port", str(dest.port), "--called-ae", dest.called_ae, "--calling-ae", dest.calling_ae,
        "--retry-initial-s", "0.05", "--retry-max-s", "0.5", "--drain-timeout", "30",
    ]  # fmt: skip
    sender = subprocess.Popen([*cmd, "--pause-between-s", "0.4"], stderr=subprocess.DEVNULL)
    try:
        poll(lambda: len(orthanc.instances()) >= 2, 20, "the first images of the series")
        sender.send_signal(signal.SIGKILL)
        sender.wait(10)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    arrived = len(orthanc.instances())
    left = Spool(config.spool_dir).pending_count("orthanc")
    assert 2 <= arrived < 8 and left >= 8 - arrived, (arrived, left)  # killed mid-series
    restarted = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert restarted.returncode == 0, restarted.stderr
    assert Spool(config.spool_dir).pending_count("orthanc") == 0
    assert len(orthanc.instances()) == 8
    assert (
        sorted(orthanc.sop_uids()) == want
    )  # same UIDs: the resend of an image already stored is idempotent


def _tls_orthanc(orthanc_factory, pki, *, require_client_cert: bool = True):
    return orthanc_factory(
        DicomTlsEnabled=True,
        DicomTlsCertificate=str(pki["server.pem"]),
        DicomTlsPrivateKey=str(pki["server.key"]),
        DicomTlsTrustedCertificates=str(pki["ca.pem"]),
        DicomTlsRemoteCertificateRequired=require_client_cert,
    )


def test_mutual_tls_delivers_and_client_without_certificate_is_refused(
    vol, orthanc_factory, dicom_config, test_pki
):
    orthanc = _tls_orthanc(orthanc_factory, test_pki)
    mutual = TlsConfig(
        ca_file=test_pki["ca.pem"], cert_file=test_pki["client.pem"], key_file=test_pki["client.key"]
    )
    config = dicom_config(orthanc, tls=mutual)
    result = echo(config.destinations[0], config)
    assert result.ok, result.message
    store_series(vol.make_volume(n_slices=3), config)
    report = PacsSender(config).drain(timeout_s=20)
    assert (report.stored, report.pending) == (3, 0)
    assert len(orthanc.instances()) == 3

    # same CA, no client certificate: the handshake is refused and nothing is stored
    anonymous = dicom_config(orthanc, tls=TlsConfig(ca_file=test_pki["ca.pem"]))
    refused = echo(anonymous.destinations[0], anonymous)
    assert not refused.ok and "TLS handshake failed" in refused.message, refused.message
    # plain DICOM to the TLS port fails too
    plain = dicom_config(orthanc)
    assert not echo(plain.destinations[0], plain).ok
    store_series(vol.make_volume(n_slices=3, seed=9), anonymous)
    report = PacsSender(anonymous).drain(timeout_s=0.5)
    assert report.stored == 0 and report.pending == 3 and report.quarantined == 0  # kept for retry
    assert len(orthanc.instances()) == 3
