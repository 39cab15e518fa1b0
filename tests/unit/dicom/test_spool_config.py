"""Spool layout and guarantees; config validation; status classification; back-off."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recon_server.dicom.config import DicomConfig, PacsDestination, RetryPolicy, TlsConfig
from recon_server.dicom.sender import Outcome, classify_status
from recon_server.dicom.spool import Spool

SERIES_A, SERIES_B = "1.2.3.1", "1.2.3.2"


def test_enqueue_lists_oldest_series_first_and_completes(tmp_path):
    spool = Spool(tmp_path)
    for i, series in enumerate([SERIES_B, SERIES_A, SERIES_B]):
        items = spool.enqueue(
            f"data{i}".encode(), series_uid=series, sop_uid=f"9.{i}", destinations=["a", "b"]
        )
        for item in items:  # make the spool order unambiguous on coarse file-system clocks
            os.utime(item.path, ns=(i * 10**9, i * 10**9))
    batches = spool.pending("a")
    assert [b.series_uid for b in batches] == [SERIES_B, SERIES_A]
    assert [i.sop_uid for i in batches[0].items] == ["9.0", "9.2"]
    assert (tmp_path / "b" / "pending" / SERIES_A / "9.1.dcm").read_bytes() == b"data1"
    assert not any((tmp_path / "tmp").iterdir())  # temp file gone after enqueue
    spool.complete(batches[1].items[0])
    assert spool.pending_count("a") == 2 and spool.pending_count("b") == 3
    assert not (tmp_path / "a" / "pending" / SERIES_A).exists()  # empty series folder removed
    spool.complete(batches[1].items[0])  # idempotent


def test_quarantine_records_reason_and_requeue(tmp_path):
    spool = Spool(tmp_path)
    (item,) = spool.enqueue(b"x", series_uid=SERIES_A, sop_uid="9.1", destinations=["pacs"])
    target = spool.quarantine(item, "C-STORE refused with status 0xA900", status=0xA900)
    assert target == tmp_path / "pacs" / "quarantine" / SERIES_A / "9.1.dcm" and target.read_bytes() == b"x"
    record = json.loads(target.with_suffix(".reason.json").read_text())
    assert record["status"] == "0xA900" and "0xA900" in record["reason"]
    assert spool.pending_count("pacs") == 0
    assert [r["reason"] for _, r in spool.quarantined("pacs")] == [record["reason"]]
    assert spool.requeue("pacs") == 1 and spool.pending_count("pacs") == 1
    assert spool.quarantined("pacs") == []


def test_spool_rejects_path_like_uids(tmp_path):
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        Spool(tmp_path).enqueue(b"x", series_uid="../../etc", sop_uid="1.2", destinations=["a"])


def test_pending_survives_a_new_spool_object(tmp_path):
    Spool(tmp_path).enqueue(b"x", series_uid=SERIES_A, sop_uid="9.1", destinations=["a"])
    assert Spool(tmp_path).pending_count() == 1  # "restart": a fresh object sees the same files


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, Outcome.SUCCESS),
        (0xB000, Outcome.WARNING),
        (0xB006, Outcome.WARNING),
        (0xB007, Outcome.WARNING),
        (0xA700, Outcome.RETRY),
        (0xA7FF, Outcome.RETRY),
        (None, Outcome.RETRY),
        (0xA900, Outcome.PERMANENT),
        (0xC000, Outcome.PERMANENT),
        (0xC123, Outcome.PERMANENT),
        (0x0122, Outcome.PERMANENT),
    ],
)
def test_status_classification(status, outcome):
    assert classify_status(status) is outcome


def test_backoff_is_exponential_and_capped():
    policy = RetryPolicy(initial_s=0.5, max_s=4.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.delay(10_000) == 4.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"called_ae": "A_VERY_LONG_AE_TITLE"}, "longer than 16"),
        ({"called_ae": ""}, "must not be empty"),
        ({"calling_ae": "RÉCON"}, "printable ASCII"),
        ({"port": 0}, "1..65535"),
        ({"port": 70000}, "1..65535"),
        ({"name": "../x"}, "destination name"),
        ({"host": ""}, "host"),
    ],
)
def test_destination_validation(kwargs, message):
    base = {"name": "pacs", "host": "127.0.0.1", "port": 104, "called_ae": "PACS"}
    with pytest.raises(ValueError, match=message):
        PacsDestination(**{**base, **kwargs})


def test_config_validation(tmp_path):
    dest = PacsDestination("pacs", "127.0.0.1", 104, "PACS")
    with pytest.raises(ValueError, match="unique"):
        DicomConfig(tmp_path, tmp_path, destinations=(dest, dest))
    with pytest.raises(ValueError, match="uid_root"):
        DicomConfig(tmp_path, tmp_path, uid_root="1.02.3.")
    with pytest.raises(ValueError, match="cert_file and key_file"):
        TlsConfig(ca_file=Path("ca.pem"), cert_file=Path("c.pem"))
    with pytest.raises(FileNotFoundError, match="TLS file not found"):
        TlsConfig(ca_file=tmp_path / "missing.pem").ssl_context()
    assert DicomConfig(str(tmp_path), str(tmp_path)).output_dir == tmp_path
