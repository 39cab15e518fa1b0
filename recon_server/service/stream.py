"""One stream, from the first readout to the last image: what the MRD server and the Gadgetron
gadget share.

Each listener reads its own preamble (the MRD server: CONFIG / TEXT / HEADER with the journal;
Gadgetron: ``gadgetron.external.Connection``), builds an :class:`~recon_server.mrd.assemble.Assembler`
and hands the rest to :func:`read_readouts` and :func:`reconstruct_stream`; a failure goes to
:func:`report_failure`. What differs on the wire (TEXT ``ERR`` + CLOSE vs ERROR (8); progress
as TEXT or only in the log) lives in the listener's :class:`Replies`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

import ismrmrd
import numpy as np

from recon_server.dicom.writer import dicom_series_description
from recon_server.mrd import wire
from recon_server.mrd.assemble import Assembler
from recon_server.ops import service_metrics
from recon_server.recon.pipeline import Progress, fallback_note
from recon_server.scan import ImageVolume, KSpaceScan
from recon_server.service.worker import DeliveryLog, ReconService

log = logging.getLogger(__name__)

#: The prefix of a progress TEXT message (``PROGRESS FLAIR dps-fast: slice 3/16, ...``).
PROGRESS_PREFIX = "PROGRESS "


class Replies(Protocol):
    """How one listener answers its peer."""

    def image(self, image: wire.Image) -> None: ...

    def progress(self, text: str) -> None: ...

    def finish(self) -> None: ...

    def error(self, text: str) -> None: ...


def volume_to_images(volume: ImageVolume, *, dtype: str = "float32") -> list[wire.Image]:
    """One ISMRMRD magnitude image per slice, with meta: series description, window, image type,
    method and its settings (JSON), model name and version."""
    images = []
    mag = volume.magnitude
    if dtype == "uint16":
        data = np.clip(np.rint(mag), 0, 65535).astype(np.uint16)
    else:
        data = mag.astype(np.float32)
    prov = volume.provenance
    settings = json.dumps(prov.settings, sort_keys=True, default=str)
    model = {"ModelName": prov.model_name, "ModelVersion": prov.model_version} if prov.model_name else {}
    note = fallback_note(prov)
    fallback = (
        {
            "Fallback": note,
            "ImageComments": f"Fallback reconstruction ({prov.method}): "
            f"{prov.settings['fallback_from']} failed: {prov.settings.get('fallback_reason', '')}",
        }
        if note
        else {}
    )
    for i, geom in enumerate(volume.geometry):
        head = wire.new_image_head()
        head["measurement_uid"] = volume.measurement_uid
        head["field_of_view"] = geom.fov_mm
        head["position"], head["read_dir"] = geom.position, geom.read_dir
        head["phase_dir"], head["slice_dir"] = geom.phase_dir, geom.slice_dir
        head["patient_table_position"] = geom.table_position
        head["acquisition_time_stamp"] = geom.acquisition_time_stamp
        head["physiology_time_stamp"] = geom.physiology_time_stamp
        head["slice"] = geom.slice_index
        head["image_type"] = ismrmrd.IMTYPE_MAGNITUDE
        head["image_index"] = i + 1
        head["image_series_index"] = volume.series_index
        meta = ismrmrd.Meta(
            {
                # An SD map is a quantitative companion of the image series, not a second image.
                "DataRole": "Image" if volume.role == "image" else "Quantitative",
                "ImageProcessingHistory": ["RECON-SERVER", volume.provenance.method.upper()],
                "SeriesDescription": dicom_series_description(volume),
                "SequenceDescriptionAdditional": volume.provenance.method,
                "ImageType": "\\".join(volume.image_type),
                "WindowCenter": f"{volume.window_center:.3f}",
                "WindowWidth": f"{volume.window_width:.3f}",
                "ReconMethod": volume.provenance.method,
                "ReconSettings": settings,
                "Contrast": volume.contrast,
                **model,
                **fallback,
            }
        )
        images.append(wire.Image(head=head, meta_xml=meta.serialize(), data=data[i][None, None]))
    return images


def read_readouts(
    reader: wire.WireReader,
    asm: Assembler,
    *,
    on_acquisition: Callable[[wire.Acquisition], None] | None = None,
    on_recon_data: Callable[[wire.ReconData], None] | None = None,
    on_text: Callable[[wire.Text], None] | None = None,
) -> None:
    """Feed readouts (ACQUISITION or RECON_DATA) to ``asm`` until CLOSE; waveforms are skipped.

    TEXT goes to ``on_text`` (a ProtocolError where the listener takes none), as does any other
    message: every type outside a scan's readouts is a protocol error.
    """
    while True:
        msg = reader.read_message()
        if isinstance(msg, wire.Acquisition):
            if on_acquisition is not None:
                on_acquisition(msg)
            asm.add(msg)
        elif isinstance(msg, wire.Close):
            return
        elif isinstance(msg, wire.Waveform):
            continue
        elif isinstance(msg, wire.ReconData):
            if on_recon_data is not None:
                on_recon_data(msg)
            asm.add_recon_data(msg)
        elif isinstance(msg, wire.Text) and on_text is not None:
            on_text(msg)
        else:
            raise wire.ProtocolError(f"unexpected {type(msg).__name__} message inside a scan")


def reconstruct_stream(
    listener: str,
    asm: Assembler,
    reader: wire.WireReader,
    service: ReconService,
    replies: Replies,
    *,
    peer: object,
    started: float,
    method: str | None,
    samples: int | None = None,
    delivery: DeliveryLog | None = None,
    poll: Callable[[], None] | None = None,
    image_dtype: str = "float32",
    on_scans: Callable[[list[KSpaceScan]], None] | None = None,
    on_delivered: Callable[[], None] | None = None,
) -> int:
    """The assembled scans through the service (worker, then every sink), their images back to
    the peer; counts and logs the stream. Returns the number of images sent.

    ``started``: ``time.perf_counter()`` when the stream's first message was read; ``on_scans``
    sees the scans before they are queued, ``on_delivered`` runs after every sink took them and
    before the images go back.
    """
    scans = asm.finish()
    if on_scans is not None:
        on_scans(scans)
    service_metrics.scans_received(
        listener,
        scans=len(scans),
        readouts=asm.n_lines,
        nbytes=reader.bytes_read,
        seconds=time.perf_counter() - started,
    )
    with service_metrics.in_service(listener, len(scans)):
        volumes = service.run(
            scans,
            method=method,
            samples=samples,
            delivery=delivery,
            poll=poll,
            progress=lambda done: _progress(replies, done),
        )
    service_metrics.volumes_done(volumes)
    if on_delivered is not None:
        on_delivered()
    t_send = time.perf_counter()
    count = 0
    for volume in volumes:
        for image in volume_to_images(volume, dtype=image_dtype):
            replies.image(image)
            count += 1
    replies.finish()
    service_metrics.stream_done(listener, images=count, send_seconds=time.perf_counter() - t_send)
    log.info(
        "%s stream from %s: %d readouts, %.1f MB, %d scan(s), %d images sent",
        listener,
        peer,
        asm.n_lines,
        reader.bytes_read / 1e6,
        len(scans),
        count,
    )
    return count


def _progress(replies: Replies, progress: Progress) -> None:
    """Log the slice count and hand it to the peer's replies (runs on the worker thread)."""
    text = progress.text()
    log.info("%s", text)
    replies.progress(text)


def report_failure(
    listener: str, replies: Replies, peer: object, exc: Exception, note: str = "", *, name: str = ""
) -> None:
    """Count and log a failed stream, then tell the peer (:meth:`Replies.error`) if it still listens.

    ``name``: the error's name on the wire (default: the exception's class)."""
    service_metrics.stream_failed(listener, exc)
    name = name or type(exc).__name__
    # The text, not the exception: a handler that keeps records (a queue, a test's capture)
    # would keep its traceback's frames, and the failed scan's buffers with them, alive.
    log.error("%s stream from %s failed: %s: %s", listener, peer, name, str(exc))
    try:
        replies.error(f"{name}: {exc}{note}")
    except OSError as send_exc:
        log.info("could not report the error to %s: %s", peer, send_exc)
