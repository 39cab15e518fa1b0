"""Standalone MRD stream server (``recon-server serve``, default 127.0.0.1:9002).

Speaks to ``gadgetron_ismrmrd_client``, ismrmrd-python's ProtocolSerializer and Siemens
FIRE / OpenRecon clients. One stream, one scan session::

    client -> server   CONFIG_FILE (1) or CONFIG_TEXT (2)   optional (XML <property> or JSON)
                       HEADER (3)                             ISMRMRD XML
                       TEXT (5)                               optional JSON ("method", "contrast",
                                                              or FIRE's {"parameters": {...}})
                       ACQUISITION (1008) / WAVEFORM (1026, ignored) / RECON_DATA (1023) ...
                       CLOSE (4)
    server -> client   IMAGE (1022) per slice, float32 or uint16 magnitude, meta XML
                       CLOSE (4)

Client configuration conventions: :mod:`recon_server.mrd.client_config`. A configuration the
server cannot run (an unknown ``method``, ``samples`` out of range) is answered with ``ERR`` as
soon as it arrives, before the readouts are uploaded, and such a stream is not kept as a failed
scan. A CONFIG_FILE name that is not a method is logged as a warning naming the method used.

Returned images carry, as Gadgetron's do, the readouts' ``measurement_uid``, each slice's
position and directions, ``patient_table_position``, ``acquisition_time_stamp`` and
``physiology_time_stamp`` (of the slice's first imaging readout). Images a fallback method made
(``pipeline``) carry meta ``Fallback`` = ``"<configured> -> <fallback>: <reason>"`` and
``ImageComments``.

Errors: the server logs one line, sends ``TEXT "ERR <message>"`` (every client above reads
TEXT; FIRE treats the ``ERR`` prefix as an error level, gadgetron_ismrmrd_client prints it),
then CLOSE, closes that connection and keeps serving. (ERROR (8) goes only to Gadgetron, by
the external gadget.) Each connection runs in its own thread; reconstructions go through
one :class:`~recon_server.pipeline.ReconWorker` queue.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import ismrmrd
import numpy as np

from recon_server.config import MAX_POSTERIOR_SAMPLES, ServiceConfig
from recon_server.data import ismrmrd_io
from recon_server.dicom.writer import dicom_series_description
from recon_server.mrd import wire
from recon_server.mrd.assemble import Assembler
from recon_server.mrd.client_config import (
    ClientConfigError,
    json_options,
    requested_method,
    text_options,
    unknown_config_names,
)
from recon_server.ops import logs as ops_logs
from recon_server.ops import metrics
from recon_server.pipeline import ReconService, ReconWorker, Sink, fallback_note
from recon_server.recon.methods import METHODS
from recon_server.scan import ImageVolume

log = logging.getLogger(__name__)


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


def samples_override(options: dict) -> int | None:
    """Posterior samples asked for by the client's JSON (``{"samples": 8}``, a JSON integer), bounded."""
    value = options.get("samples")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_POSTERIOR_SAMPLES:
        raise ClientConfigError(f"samples must be an integer in 1..{MAX_POSTERIOR_SAMPLES}, got {value!r}")
    return value


def method_override(config_name: str, options: dict) -> str | None:
    """A method named by the client (:func:`recon_server.mrd.client_config.requested_method`)."""
    return requested_method(options, config_name)


MAX_CONFIG_MESSAGES = 16  # CONFIG / TEXT messages accepted before the HEADER


class StreamSession:
    """Reads one client stream into scans: config, header, optional JSON, readouts, CLOSE.

    The client's choice (``method``, ``samples``) is checked as each configuration message
    arrives: :class:`ClientConfigError` ends the stream there, before the readouts.
    """

    def __init__(
        self, reader: wire.WireReader, *, keep_acquisitions: bool = False, calibration_lines: str = "auto"
    ) -> None:
        self.reader = reader
        self.calibration_lines = calibration_lines
        self.config_name = ""
        self.options: dict = {}
        self.method: str | None = None
        self.samples: int | None = None
        self.assembler: Assembler | None = None
        self.header_xml = ""
        # With keep_acquisitions, every readout is also kept as it arrived, so that a scan whose
        # reconstruction fails can be written to disk and replayed later (not lost).
        self.acquisitions: list[wire.Acquisition] | None = [] if keep_acquisitions else None

    def _configure(self, options: dict | None = None) -> None:
        if options:
            self.options.update(options)
            if self.assembler is not None:
                self.assembler.config = self.options
        self.method = requested_method(self.options, self.config_name)
        self.samples = samples_override(self.options)

    def read(self) -> Assembler:
        reader = self.reader
        msg = reader.read_message()
        for _ in range(MAX_CONFIG_MESSAGES):
            if isinstance(msg, wire.ConfigFile):
                self.config_name = msg.name.strip().rstrip("\0").strip()
                self._configure()
            elif isinstance(msg, wire.ConfigText):
                self.config_name = "config-text"
                self._configure(text_options(msg.text))
            elif isinstance(msg, wire.Text):
                self._configure(json_options(msg.text))
            else:
                break
            msg = reader.read_message()
        if not isinstance(msg, wire.Header):
            raise wire.ProtocolError(f"expected the ISMRMRD HEADER (3), got {type(msg).__name__}")
        self.header_xml = msg.xml
        asm = Assembler(msg.xml, config=self.options, calibration_lines=self.calibration_lines)
        ops_logs.set_measurement(asm.measurement_id)  # every later log line of this stream
        self.assembler = asm
        while True:
            msg = reader.read_message()
            if isinstance(msg, wire.Acquisition):
                if self.acquisitions is not None:
                    self.acquisitions.append(msg)
                asm.add(msg)
            elif isinstance(msg, wire.Close):
                return asm
            elif isinstance(msg, wire.Waveform):
                continue
            elif isinstance(msg, wire.Text):
                if asm.n_lines == 0:
                    self._configure(json_options(msg.text))
            elif isinstance(msg, wire.ReconData):
                asm.add_recon_data(msg)
            else:
                raise wire.ProtocolError(f"unexpected {type(msg).__name__} message inside a scan")


class StreamServer:
    """Accept loop; one thread per connection; one reconstruction worker shared by all."""

    def __init__(
        self, config: ServiceConfig, *, sinks: Sequence[Sink] = (), worker: ReconWorker | None = None
    ):
        config.check_methods(METHODS)
        self.config = config
        self.worker = worker or ReconWorker(
            device=config.device, max_pending=config.max_pending_scans, fallback=config.fallback_method
        )
        self.service = ReconService(methods=config.method_for, worker=self.worker, sinks=list(sinks))
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self.address: tuple[str, int] | None = None

    def bind(self) -> tuple[str, int]:
        sock = socket.create_server((self.config.host, self.config.port), reuse_port=False)
        self._sock = sock
        self.address = sock.getsockname()[:2]
        return self.address

    def serve_forever(self) -> None:
        if self._sock is None:
            self.bind()
        assert self._sock is not None and self.address is not None
        log.info("MRD stream server listening on %s:%d", self.address[0], self.address[1])
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            threading.Thread(target=self.handle, args=(conn, peer), daemon=True, name=f"mrd-{peer}").start()

    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread; returns the bound address."""
        address = self.bind()
        threading.Thread(target=self.serve_forever, daemon=True, name="mrd-accept").start()
        return address

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        self.worker.close()

    def _keep_failed(self, session: StreamSession, exc: Exception) -> Path | None:
        """Write what arrived of a failed scan as an ISMRMRD raw file (if configured and any came)."""
        folder = self.config.failed_scans_dir
        if folder is None or not session.header_xml or not session.acquisitions:
            return None
        if isinstance(exc, ClientConfigError):
            return None  # a configuration the server refused, not a failed scan
        measurement = session.assembler.measurement_id if session.assembler else ""
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{measurement or 'scan'}-{threading.get_ident()}.h5"
        path = folder / "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            acqs = session.acquisitions
            ismrmrd_io.write_raw(
                path,
                session.header_xml,
                np.array([a.head for a in acqs], dtype=ismrmrd_io.ACQUISITION_HEADER_DTYPE),
                [a.data for a in acqs],
                trajectories=[a.traj for a in acqs],
            )
        except (OSError, ValueError) as exc:
            log.error("could not keep the failed scan's raw data in %s: %s", folder, exc)
            return None
        log.warning("failed scan kept: %s (%d readouts; replay it with recon-server replay)", path, len(acqs))
        return path

    def _warn_unknown_config(self, session: StreamSession, scans: Sequence[object]) -> None:
        """One warning when the client named a configuration that is not a method here."""
        names = unknown_config_names(session.options, session.config_name)
        if names:
            used = sorted({self.config.method_for(getattr(scan, "contrast", "")) for scan in scans})
            log.warning(
                "configuration %s is not a reconstruction method of this server; using %s instead",
                " / ".join(repr(n) for n in names),
                ", ".join(used) or self.config.default_method,
            )

    @staticmethod
    def _report_failure(
        writer: wire.WireWriter, peer: object, exc: Exception, kept: Path | None = None
    ) -> None:
        """Count and log the failure, then tell the peer (TEXT ``ERR ...`` + CLOSE) if it still listens."""
        metrics.stream_failed("mrd", exc)
        # A refused configuration reads "ERR ValueError: ..." on the wire, as it always has.
        name = "ValueError" if isinstance(exc, ClientConfigError) else type(exc).__name__
        log.error("stream from %s failed: %s: %s", peer, name, exc)
        note = f" (raw data kept on the server as {kept.name})" if kept else ""
        try:
            writer.send(wire.Text(f"ERR {name}: {exc}{note}"), flush=False)
            writer.send(wire.Close())
        except OSError as send_exc:
            log.info("could not report the error to %s: %s", peer, send_exc)

    def handle(self, conn: socket.socket, peer: object) -> None:
        """Serve one stream; every failure becomes ``TEXT "ERR ..."`` + CLOSE to the peer."""
        with ops_logs.connection_context(peer):
            self._handle(conn, peer)

    def _handle(self, conn: socket.socket, peer: object) -> None:
        conn.settimeout(self.config.socket_timeout_s)
        reader = wire.WireReader(conn.makefile("rb", buffering=1 << 20), self.config.limits)
        writer = wire.WireWriter(conn.makefile("wb", buffering=1 << 20))
        session = StreamSession(
            reader,
            keep_acquisitions=self.config.failed_scans_dir is not None,
            calibration_lines=self.config.calibration_lines,
        )
        try:
            t0 = time.perf_counter()
            asm = session.read()
            method, samples = session.method, session.samples
            scans = asm.finish()
            if method is None:
                self._warn_unknown_config(session, scans)
            metrics.scans_received(
                "mrd",
                scans=len(scans),
                readouts=asm.n_lines,
                nbytes=reader.bytes_read,
                seconds=time.perf_counter() - t0,
            )
            with metrics.in_service("mrd", len(scans)):
                volumes = self.service.run(scans, method=method, samples=samples)
            metrics.volumes_done(volumes)
            t_send = time.perf_counter()
            count = 0
            for volume in volumes:
                for image in volume_to_images(volume, dtype=self.config.image_dtype):
                    writer.send(image, flush=False)
                    count += 1
            writer.send(wire.Close())
            metrics.stream_done("mrd", images=count, send_seconds=time.perf_counter() - t_send)
            log.info(
                "stream from %s: %d readouts, %.1f MB, %d scan(s), %d images sent",
                peer,
                asm.n_lines,
                reader.bytes_read / 1e6,
                len(scans),
                count,
            )
        except (ValueError, OSError, RuntimeError) as exc:  # ProtocolError is a ValueError
            self._report_failure(writer, peer, exc, self._keep_failed(session, exc))
        except Exception as exc:  # noqa: BLE001 - the connection boundary: a bug must not go unreported
            log.exception("stream from %s: internal error", peer)
            self._report_failure(writer, peer, exc, self._keep_failed(session, exc))
        finally:
            for stream in (reader.stream, writer.stream):
                try:
                    stream.close()  # type: ignore[union-attr]
                except OSError:
                    pass
            close_gracefully(conn)


def close_gracefully(conn: socket.socket, *, drain_s: float = 1.0, max_drain: int = 64 << 20) -> None:
    """Half-close, then discard what the peer still sends (bounded) so that our last bytes
    (the error text, CLOSE) are not lost to a TCP reset, and close."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(drain_s)
        drained = 0
        while drained < max_drain:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass
    finally:
        conn.close()
