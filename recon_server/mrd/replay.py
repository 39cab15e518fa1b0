"""Replay client: stream an ISMRMRD raw file to an MRD server and save the images it returns.

Sends CONFIG_FILE (1), HEADER (3), an optional JSON TEXT (5) (``{"method": ...}``), every
acquisition (bulk-read with :func:`recon_server.data.ismrmrd_io.read_raw`) and CLOSE, while a
second thread reads the replies (IMAGE, TEXT, ERROR) until CLOSE, so an error the server
reports mid-stream is not lost. Writes ``images.npy`` (float32, images x rows x cols, in
arrival order) and ``images.h5`` (ISMRMRD images, group ``dataset/images``).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd
import numpy as np
from tqdm import tqdm

from recon_server.data import ismrmrd_io
from recon_server.mrd import wire

log = logging.getLogger(__name__)


class ReplayError(RuntimeError):
    """The server reported an error (TEXT "ERR ..." or ERROR (8)) or the stream broke."""


@dataclass
class ReplayResult:
    images: list[wire.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    closed: bool = False
    bytes_sent: int = 0

    def magnitude(self, role: str = "Image") -> np.ndarray:
        """float32 ``(images, rows, cols)`` of the returned images whose meta ``DataRole`` is
        ``role`` ("Image"; "Quantitative" for SD maps), first channel and z."""
        images = [im for im in self.images if _data_role(im) == role]
        if not images:
            return np.zeros((0, 0, 0), dtype=np.float32)
        shapes = {im.data.shape[-2:] for im in images}
        if len(shapes) != 1:
            raise ReplayError(f"returned images differ in size: {sorted(shapes)}")
        return np.stack([np.abs(im.data[0, 0]).astype(np.float32) for im in images])


def _data_role(image: wire.Image) -> str:
    if not image.meta_xml:
        return "Image"
    return str(ismrmrd.Meta.deserialize(image.meta_xml).get("DataRole", "Image"))


def _read_replies(reader: wire.WireReader, result: ReplayResult) -> None:
    try:
        while True:
            msg = reader.read_message()
            if isinstance(msg, wire.Close):
                result.closed = True
                return
            if isinstance(msg, wire.Image):
                result.images.append(msg)
            elif isinstance(msg, wire.Error):
                result.errors.append(msg.text)
            elif isinstance(msg, wire.Text):
                (result.errors if msg.text.startswith("ERR") else result.texts).append(msg.text)
    except (ValueError, OSError) as exc:  # EndOfStream / ProtocolError are ValueErrors
        if not result.closed:
            result.errors.append(f"connection ended without CLOSE: {exc}")


def stream_scan(
    raw: ismrmrd_io.RawScan,
    *,
    host: str,
    port: int,
    config_name: str = "default",
    options: dict | None = None,
    progress: bool = True,
    timeout_s: float = 600.0,
    limits: wire.WireLimits | None = None,
) -> ReplayResult:
    """Send one raw scan and collect the replies (does not raise on server errors)."""
    result = ReplayResult()
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        rfile = sock.makefile("rb", buffering=1 << 20)
        reader = wire.WireReader(rfile, limits)
        replies = threading.Thread(target=_read_replies, args=(reader, result), daemon=True)
        replies.start()
        out = sock.makefile("wb", buffering=1 << 20)
        writer = wire.WireWriter(out)
        try:
            writer.send(wire.ConfigFile(config_name), flush=False)
            writer.send(wire.Header(raw.header_xml), flush=False)
            if options:
                writer.send(wire.Text(json.dumps(options)), flush=False)
            heads = raw.acquisition_headers
            empty = np.zeros((0, 0), dtype=np.float32)
            for i in tqdm(range(len(raw)), desc="replay", unit="acq", disable=not progress):
                traj = raw.trajectories[i] if raw.trajectories is not None else empty
                writer.send(wire.Acquisition(heads[i], raw.data[i], traj), flush=False)
            writer.send(wire.Close())
        except OSError as exc:
            log.warning("sending stopped: %s", exc)
            result.errors.append(f"sending stopped: {exc}")
        result.bytes_sent = writer.bytes_written
        replies.join(timeout_s)
        for stream in (out, rfile):
            try:
                stream.close()
            except OSError:
                pass
    return result


def to_ismrmrd_images(images: list[wire.Image]) -> list[ismrmrd.Image]:
    """Convert decoded wire images to ismrmrd-python images (for HDF5 output)."""
    return [
        ismrmrd.Image(head=im.head.tobytes(), attribute_string=im.meta_xml, data=im.data) for im in images
    ]


def save_images(result: ReplayResult, out_dir: Path) -> Path:
    """Write ``images.npy`` (and ``sd.npy`` when SD maps came back) and ``images.h5`` (every
    image) into ``out_dir``; returns the path of ``images.npy``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    npy = out_dir / "images.npy"
    np.save(npy, result.magnitude())
    sd = result.magnitude("Quantitative")
    if sd.size:
        np.save(out_dir / "sd.npy", sd)
    if result.images:
        h5 = out_dir / "images.h5"
        h5.unlink(missing_ok=True)
        ismrmrd_io.write_images(h5, to_ismrmrd_images(result.images))
    return npy


def replay_file(
    path: Path,
    *,
    host: str,
    port: int,
    out_dir: Path,
    method: str | None = None,
    samples: int | None = None,
    config_name: str = "default",
    progress: bool = True,
) -> ReplayResult:
    """Replay a raw file, save the images; ReplayError carrying the server's text on failure.

    ``method`` and ``samples`` (posterior samples: mean image + SD map) go to the server as the
    JSON TEXT message after the header.
    """
    raw = ismrmrd_io.read_raw(path)
    options = {k: v for k, v in (("method", method), ("samples", samples)) if v is not None}
    result = stream_scan(
        raw,
        host=host,
        port=port,
        config_name=config_name,
        options=options or None,
        progress=progress,
    )
    if result.errors:
        raise ReplayError("; ".join(result.errors))
    if not result.images:
        raise ReplayError("the server returned no images")
    save_images(result, out_dir)
    return result
