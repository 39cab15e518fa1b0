"""Identity of a new series: deterministic UIDs and the SeriesNumber.

UIDs are deterministic (:func:`make_uid`): the series UID hashes study, measurement, series
index and method/model (and the raw stream's digest when the header lacks a study UID or a
measurement ID); each SOPInstanceUID (:mod:`recon_server.dicom.writer`) also hashes the stored
pixel bytes, so a re-run or replay gives the same UIDs, changed pixels give new ones, and two
different scans never share one. SeriesNumber = scanner series x 100000 + method slot x 10000 +
series index (:func:`series_number`).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass

from recon_server.dicom.config import UUID_UID_ROOT, validate_uid_root
from recon_server.scan import ImageVolume
from recon_server.scan_header import ScanHeader

log = logging.getLogger(__name__)


def make_uid(root: str, *parts: object) -> str:
    """Deterministic UID from a hash of ``parts`` under ``root``.

    ``2.25.`` root: the SHA-256 digest becomes a name-based UUID (RFC 4122 version 5 bits set)
    written as a decimal integer (ITU-T X.667). Any other root: the digest as a decimal
    integer cut to the digits left within 64 characters.
    """
    validate_uid_root(root)
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    if root == UUID_UID_ROOT:
        return root + str(uuid.UUID(bytes=digest[:16], version=5).int)
    digits = 64 - len(root)
    return root + str(int.from_bytes(digest, "big") % 10**digits or 1)


@dataclass(frozen=True)
class SeriesIdentity:
    """UIDs and number of the new series (and whether identifiers came from the header)."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    series_number: int
    study_uid_generated: bool
    patient_id_missing: bool


#: SeriesNumber digit of each registered method (docs/dicom.md, "UIDs and series number");
#: other names get 7, 8 or 9 from a hash of the name.
METHOD_SLOTS = {"zero-filled": 1, "cg-sense": 2, "l1-wavelet": 3, "dps": 4, "dps-fast": 5, "dps-warm": 6}
#: Largest scanner series number used as the prefix (keeps every number within IS/int32).
MAX_SCANNER_SERIES = 21473
SCANNER_SERIES_FACTOR = 100_000
METHOD_SLOT_FACTOR = 10_000


def method_slot(method: str) -> int:
    """The SeriesNumber digit of ``method`` (1-6 for the registered methods, else 7-9)."""
    slot = METHOD_SLOTS.get(method)
    if slot is None:
        slot = 7 + hashlib.sha256(method.encode()).digest()[0] % 3
    return slot


def series_number(scanner_series: int, method: str, series_index: int) -> int:
    """``P * 100000 + M * 10000 + S``: P the scanner's series number (0 when absent), M the
    method slot, S the series index modulo 10000.

    Every result is >= 10000 and, with a scanner number, >= 100000, so it is above the
    scanner's own (small) series numbers; two methods on one scan differ in M; the SD map
    (series index + 500) stays next to its image series. At most 2147399999 (IS, int32).
    """
    prefix = scanner_series if scanner_series > 0 else 0
    if prefix > MAX_SCANNER_SERIES:
        folded = 1 + (prefix - 1) % MAX_SCANNER_SERIES
        log.warning(
            "scanner series number %d too large for the SeriesNumber prefix: using %d", prefix, folded
        )
        prefix = folded
    return prefix * SCANNER_SERIES_FACTOR + method_slot(method) * METHOD_SLOT_FACTOR + series_index % 10_000


def series_identity(volume: ImageVolume, header: ScanHeader, uid_root: str) -> SeriesIdentity:
    """Deterministic identity of the new series (docs/dicom.md, UID scheme).

    When the header lacks a StudyInstanceUID or a measurement ID, ``volume.raw_digest`` (the
    raw stream's identity) goes into the hashes, so two different scans never share a study,
    series or SOP instance UID while a replay of the same raw data keeps its UIDs.
    """
    measurement = volume.measurement_id or header.measurement_id
    prov = volume.provenance
    digest = volume.raw_digest
    anonymous = not (header.study_uid and measurement)
    if anonymous and not digest:
        log.warning(
            "header without %s and volume without raw_digest: UIDs cannot tell this scan from "
            "another one with the same header fields",
            "StudyInstanceUID" if not header.study_uid else "measurement ID",
        )
    # hashed only when present, so identities from before raw_digest existed stay the same
    raw_part = (f"raw:{digest}",) if anonymous and digest else ()
    study_uid = header.study_uid
    generated = not study_uid
    if generated:
        study_uid = make_uid(
            uid_root,
            "study",
            header.patient_id,
            header.study_date,
            header.study_time,
            measurement,
            header.frame_of_reference_uid,
            *raw_part,
        )
    frame = header.frame_of_reference_uid or make_uid(uid_root, "frame", study_uid, measurement)
    series_uid = make_uid(
        uid_root,
        "series",
        study_uid,
        measurement,
        volume.series_index,
        prov.method,
        prov.model_name,
        prov.model_version,
        *raw_part,
        # a fallback is its own series (its description says so), not the deliberate method's
        *((f"fallback:{prov.settings['fallback_from']}",) if prov.settings.get("fallback_from") else ()),
    )
    number = series_number(header.series_number, prov.method, volume.series_index)
    return SeriesIdentity(study_uid, series_uid, frame, number, generated, not header.patient_id)
