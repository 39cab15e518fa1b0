"""What an ISMRMRD header says about the scans of a stream, before any readout arrives.

:func:`parse_header`, the contrast label rule (:func:`contrast_label`), and :class:`ScanLayout`: the
encoded matrix, slices and index bounds of the header's first ``<encoding>``, checked against the
server's :class:`~recon_server.mrd.wire.WireLimits`, with the k-space budget they imply.
"""

from __future__ import annotations

from dataclasses import dataclass

from ismrmrd import xsd

from recon_server.mrd import reference, wire

#: Indices a scanner may send beyond the header's encodingLimits maximum: converters and
#: simulators count one short (the ISMRMRD Shepp-Logan generator writes repetition maximum 0 and
#: sends two interleaved repetitions). Slices within it are allocated up front; each contrast or
#: repetition costs a scan's k-space and is held to ``max_scan_bytes``.
INDEX_TOLERANCE = 1
STAGING_LINES = 64  # oversampled lines staged and cropped together
KNOWN_CONTRASTS = ("FLAIR", "T1POST", "T1", "T2", "PD", "DWI")


def parse_header(header_xml: str) -> xsd.ismrmrdHeader:
    """Parse an ISMRMRD XML header; ValueError naming the problem if it does not parse."""
    try:
        return xsd.CreateFromDocument(header_xml.rstrip("\x00"))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"ISMRMRD header XML does not parse: {exc}") from None


def contrast_label(header: xsd.ismrmrdHeader, config: dict | None = None, *, contrast_index: int = 0) -> str:
    """The contrast label of a scan, by the first rule that gives one.

    1. ``config["contrast"]`` (the JSON TEXT a FIRE client sends after the header).
    2. userParameterString ``contrast`` in the XML header.
    3. Keywords in measurementInformation protocolName / seriesDescription / sequenceName:
       FLAIR; T1 with POST, GD or +C -> T1POST; T2; T1; PD; DWI / DIFF -> DWI.
    4. sequenceParameters (ms; the echo time of ``contrast_index`` if listed):
       TI >= 1500 and TE >= 60 -> FLAIR; TI present and TE < 30 -> T1;
       TR >= 2000 and TE >= 60 -> T2; TR < 1000 and TE < 30 -> T1.
    5. Otherwise ``""`` (unknown; the default method applies).
    """
    if config and isinstance(config.get("contrast"), str) and config["contrast"].strip():
        return config["contrast"].strip().upper()
    params = header.userParameters
    if params is not None:
        for p in params.userParameterString or []:
            if str(p.name).lower() == "contrast" and str(p.value).strip():
                return str(p.value).strip().upper()
    info = header.measurementInformation
    if info is not None:
        text = " ".join(str(t) for t in (info.protocolName, info.seriesDescription, info.sequenceName) if t)
        text = text.upper().replace("-", "_").replace(" ", "_")
        if "FLAIR" in text:
            return "FLAIR"
        if "T1" in text and any(k in text for k in ("POST", "GD", "+C", "CONTRAST")):
            return "T1POST"
        for key in ("T2", "T1", "PD"):
            if key in text:
                return key
        if "DWI" in text or "DIFF" in text:
            return "DWI"
    seq = header.sequenceParameters
    if seq is not None:

        def pick(values: list | None) -> float | None:
            if not values:
                return None
            return float(values[min(contrast_index, len(values) - 1)])

        tr, te, ti = pick(seq.TR), pick(seq.TE), pick(seq.TI)
        if ti is not None and te is not None and ti >= 1500 and te >= 60:
            return "FLAIR"
        if ti is not None and te is not None and te < 30:
            return "T1"
        if tr is not None and te is not None:
            if tr >= 2000 and te >= 60:
                return "T2"
            if tr < 1000 and te < 30:
                return "T1"
    return ""


def _limit_maximum(limits: xsd.encodingLimitsType | None, name: str) -> int | None:
    """``encodingLimits.<name>.maximum``, or None when the header does not give it."""
    limit = getattr(limits, name, None) if limits is not None else None
    maximum = getattr(limit, "maximum", None)
    return int(maximum) if maximum is not None else None


@dataclass(frozen=True)
class ScanLayout:
    """The encoded matrix and index bounds of a stream's scans (the header's first encoding)."""

    enc_nx: int  # encodedSpace x: readout samples, oversampling included
    ny: int  # encodedSpace y: phase-encode lines
    recon_nx: int  # reconSpace x: the width k-space is stored at
    fov: tuple[float, float, float]  # reconSpace fieldOfView_mm
    ky_offset: int  # line ky goes to row ky + ky_offset
    n_slices: int
    index_maxima: dict[str, int | None]  # encodingLimits maximum of contrast and repetition
    max_average: int
    calibration_as_data: bool  # calibration-only lines enter k-space like imaging lines
    channels: int | None  # receiverChannels, when the header says

    @property
    def slice_capacity(self) -> int:
        """Slices each store holds: the header's and the tolerated spare ones."""
        return self.n_slices + INDEX_TOLERANCE

    @classmethod
    def of(cls, header: xsd.ismrmrdHeader, limits: wire.WireLimits, calibration_lines: str) -> ScanLayout:
        """The header's layout; ValueError when it is implausible or beyond ``limits``."""
        if not header.encoding:
            raise ValueError("ISMRMRD header has no <encoding>")
        enc = header.encoding[0]
        enc_nx, ny = int(enc.encodedSpace.matrixSize.x), int(enc.encodedSpace.matrixSize.y)
        recon_nx = int(enc.reconSpace.matrixSize.x)
        fov = enc.reconSpace.fieldOfView_mm
        if min(enc_nx, ny, recon_nx) < 1:
            raise ValueError(f"implausible encoding matrix {enc_nx} x {ny} (recon x {recon_nx})")
        if max(ny, recon_nx) > limits.max_matrix or enc_nx > limits.max_samples:
            raise ValueError(
                f"encoding matrix {enc_nx} x {ny} (recon x {recon_nx}) exceeds this "
                f"server's limits: max_matrix {limits.max_matrix} (phase-encode lines, recon columns), "
                f"max_samples {limits.max_samples} (encoded columns)"
            )
        ky_offset = ny // 2 - reference.e1_centre(enc, ny)
        enc_limits = enc.encodingLimits
        sl = getattr(enc_limits, "slice", None) if enc_limits is not None else None
        n_slices = int(sl.maximum) + 1 if sl is not None and sl.maximum is not None else 1
        if not 1 <= n_slices <= limits.max_slices:
            raise ValueError(f"the header's {n_slices} slices exceed max_slices {limits.max_slices}")
        average = _limit_maximum(enc_limits, "average")
        if calibration_lines == "auto":
            calibration_lines = "calibration" if reference.calibration_mode(enc) == "separate" else "data"
        system = header.acquisitionSystemInformation
        rc = system.receiverChannels if system is not None else None
        channels = int(rc) if rc else None
        if channels is not None and not 1 <= channels <= limits.max_channels:
            raise ValueError(
                f"the header's receiverChannels {channels} is outside 1..{limits.max_channels} (max_channels)"
            )
        return cls(
            enc_nx=enc_nx,
            ny=ny,
            recon_nx=recon_nx,
            fov=(float(fov.x), float(fov.y), float(fov.z)),
            ky_offset=ky_offset,
            n_slices=n_slices,
            index_maxima={name: _limit_maximum(enc_limits, name) for name in ("contrast", "repetition")},
            max_average=average + INDEX_TOLERANCE if average is not None else 1 << 16,
            calibration_as_data=calibration_lines == "data",
            channels=channels,
        )

    def check_budget(self, channels: int, max_scan_bytes: int) -> None:
        """Refuse a scan whose header asks for more k-space than ``max_scan_bytes``, before any buffer."""
        store = self.slice_capacity * channels * self.ny * self.recon_nx * 8
        scans = 1
        for name in ("contrast", "repetition"):
            maximum = self.index_maxima[name]
            scans *= maximum + 1 if maximum is not None else 1
        apart = 1 if self.calibration_as_data else 2  # calibration-only lines held apart
        staging = STAGING_LINES * channels * self.enc_nx * 8 if self.enc_nx > self.recon_nx else 0
        need = store * scans * apart + staging
        if need > max_scan_bytes:
            raise ValueError(
                f"the scan needs {need / 2**30:.1f} GiB of k-space ({self.slice_capacity} slices x "
                f"{channels} coils x {self.ny} x {self.recon_nx} x 8 bytes x {scans} scan(s)"
                + (" x 2 (calibration held apart)" if apart == 2 else "")
                + f"), more than this server's max_scan_bytes ({max_scan_bytes / 2**30:.1f} GiB)"
            )
