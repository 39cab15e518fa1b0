"""Status handling against an in-process pynetdicom storage SCP that answers what we tell it."""

from __future__ import annotations

import socket

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, evt

from recon_server.cli.main import main as recon_server_main
from recon_server.dicom.deliver import MissingIdentifierError, store_series
from recon_server.dicom.sender import PacsSender
from recon_server.dicom.spool import Spool


@pytest.fixture
def scp(netns):
    """A storage SCP on a free port; ``scp.statuses`` is consumed one per C-STORE (then 0x0000)."""

    class Scp:
        statuses: list[int] = []
        received: list[str] = []

    def on_store(event):
        Scp.received.append(str(event.request.AffectedSOPInstanceUID))
        return Scp.statuses.pop(0) if Scp.statuses else 0x0000

    ae = AE(ae_title="TESTPACS")
    ae.add_supported_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    Scp.port = server.server_address[1]
    yield Scp
    server.shutdown()


def test_runs_in_loopback_only_namespace(netns):
    if netns is None:
        pytest.skip("not root: no network namespace (the Orthanc tests then use loopback ports)")
    assert [name for _, name in socket.if_nameindex()] == ["lo"]


def test_out_of_resources_is_retried_with_backoff(vol, scp, dicom_config):
    scp.statuses = [0xA700]
    config = dicom_config(scp.port)
    paths = store_series(vol.make_volume(n_slices=3), config)
    sender = PacsSender(config)
    first = sender.drain_once()
    assert first.stored == 0 and first.pending == 3 and sender.state["orthanc"].failures == 1
    assert "0xA700" in first.errors[0] and first.next_due_s == pytest.approx(0.05, abs=0.01)
    report = sender.drain(timeout_s=10)
    assert (report.stored, report.pending, report.quarantined) == (3, 0, 0)
    assert sender.state["orthanc"].failures == 0
    sop = [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]
    assert scp.received == [sop[0], *sop]  # the refused image was resent, in slice order


def test_permanent_status_quarantines_only_that_image(vol, scp, dicom_config):
    scp.statuses = [0x0000, 0xA900, 0xB007]
    config = dicom_config(scp.port)
    store_series(vol.make_volume(n_slices=4), config)
    report = PacsSender(config).drain(timeout_s=10)
    assert (report.stored, report.quarantined, report.pending) == (3, 1, 0)  # 0xB007 counts as stored
    [(item, reason)] = Spool(config.spool_dir).quarantined("orthanc")
    assert reason["status"] == "0xA900" and "refused" in reason["reason"]
    assert item.path.is_file() and item.path.with_suffix(".reason.json").is_file()


def test_missing_identifiers_are_not_sent_unless_allowed(vol, scp, dicom_config):
    header = vol.make_header(patient_id=None, study_uid=None)
    volume = vol.make_volume(header_xml=header)
    config = dicom_config(scp.port)
    with pytest.raises(MissingIdentifierError, match="PatientID and StudyInstanceUID") as err:
        store_series(volume, config)
    assert len(err.value.paths) == 4 and all(p.is_file() for p in err.value.paths)  # research copy kept
    assert Spool(config.spool_dir).pending_count() == 0
    # a file that reaches the spool another way is refused by the sender itself
    spool = Spool(config.spool_dir)
    ds = pydicom.dcmread(err.value.paths[0])
    spool.enqueue_file(err.value.paths[0], series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID,
                       destinations=["orthanc"])  # fmt: skip
    report = PacsSender(config).drain(timeout_s=5)
    assert report.quarantined == 1 and scp.received == []
    assert "allow_missing_identifiers" in spool.quarantined("orthanc")[0][1]["reason"]
    allowed = dicom_config(scp.port, allow_missing_identifiers=True)
    store_series(volume, allowed)
    assert PacsSender(allowed).drain(timeout_s=10).stored == 4 and len(scp.received) == 4


def test_pacs_echo_command_exit_codes(scp, capsys, netns):
    args = ["pacs-echo", "--host", "127.0.0.1", "--called-ae", "TESTPACS", "--timeout", "3"]
    assert recon_server_main([*args, "--port", str(scp.port)]) == 0
    assert "success" in capsys.readouterr().out
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    assert recon_server_main([*args, "--port", str(closed)]) == 1
    assert "TCP connection failed" in capsys.readouterr().err
    assert recon_server_main([*args, "--port", "70000"]) == 2
    assert "1..65535" in capsys.readouterr().err


def test_each_destination_drains_independently(vol, scp, tmp_path, netns):
    from recon_server.dicom.config import DicomConfig, PacsDestination, RetryPolicy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    config = DicomConfig(
        tmp_path / "out",
        tmp_path / "spool",
        destinations=(
            PacsDestination("down", "127.0.0.1", closed, "TESTPACS"),
            PacsDestination("up", "127.0.0.1", scp.port, "TESTPACS"),
        ),
        retry=RetryPolicy(initial_s=0.05, max_s=0.1),
        connect_timeout_s=2.0,
    )
    store_series(vol.make_volume(n_slices=2), config)
    store_series(vol.make_volume(n_slices=2, series_index=1), config)
    spool = Spool(config.spool_dir)
    series_order = [b.series_uid for b in spool.pending("up")]
    report = PacsSender(config).drain_once()
    assert report.stored == 4 and spool.pending_count("up") == 0
    assert spool.pending_count("down") == 4 and spool.quarantined("down") == []
    first_series = [
        str(pydicom.dcmread(p).SOPInstanceUID)
        for p in sorted((tmp_path / "out" / series_order[0]).glob("*.dcm"))
    ]
    assert sorted(scp.received[:2]) == sorted(first_series)  # oldest series first
