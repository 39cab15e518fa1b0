"""Replay client: stream an ISMRMRD raw file to an MRD server and save the images it returns.

Sends CONFIG_FILE (1), HEADER (3), an optional JSON TEXT (5) (``{"method": ...}``), every
acquisition (bulk-read with :func:`recon_server.mrd.ismrmrd_io.read_raw`) and CLOSE, while a
second thread reads the replies (IMAGE, TEXT, ERROR) until CLOSE, so an error the server
reports mid-stream is not lost. Writes one float32 array per returned series,
``images_<series>.npy`` (``sd_<series>.npy`` for SD maps; images x rows x cols, in arrival
order; ``<series>`` is the images' ``image_series_index``), ``images.npy`` / ``sd.npy`` with
all of them when they share one size, and ``images.h5`` (every ISMRMRD image: group
``dataset/images``, or one group ``dataset/images_<series>`` per series when sizes differ).
A server that closes without images and without an error raises :class:`NoImagesError`
("the server returned no images"), not a server error. A server that cannot be reached raises
ConnectionError ``cannot connect to HOST:PORT: connection refused`` (or the reason).

TEXT messages starting with ``PROGRESS `` are the server's progress lines (``PROGRESS FLAIR
dps-fast: slice 3/16, 12.0 s elapsed, 4.00 s/slice``): kept apart in ``ReplayResult.progress``
(without the prefix) and handed to ``on_progress`` as they arrive; ``replay_file`` with
``progress=True`` prints each as ``recon-server replay: server: <text>`` on stderr.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd
import numpy as np
from tqdm import tqdm

from recon_server.mrd import ismrmrd_io, wire

log = logging.getLogger(__name__)

#: Prefix of the server's progress TEXT messages.
PROGRESS_PREFIX = "PROGRESS "


class ReplayError(RuntimeError):
    """The server reported an error (TEXT "ERR ..." or ERROR (8)) or the stream broke."""


class NoImagesError(ReplayError):
    """The server closed the stream properly, reported no error, and returned no images."""


@dataclass
class ReplayResult:
    images: list[wire.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    progress: list[str] = field(default_factory=list)  # the server's PROGRESS texts, prefix removed
    errors: list[str] = field(default_factory=list)
    closed: bool = False
    bytes_sent: int = 0
    files: list[Path] = field(default_factory=list)  # what save_images wrote

    def magnitude(self, role: str = "Image") -> np.ndarray:
        """float32 ``(images, rows, cols)`` of the returned images whose meta ``DataRole`` is
        ``role`` ("Image"; "Quantitative" for SD maps), first channel and z.

        ReplayError when they differ in size (use :meth:`series` then)."""
        images = [im for im in self.images if _data_role(im) == role]
        if not images:
            return np.zeros((0, 0, 0), dtype=np.float32)
        shapes = {im.data.shape[-2:] for im in images}
        if len(shapes) != 1:
            raise ReplayError(f"returned images differ in size: {sorted(shapes)} (see series())")
        return _stack(images)

    def series(self, role: str = "Image") -> dict[str, np.ndarray]:
        """One float32 ``(images, rows, cols)`` array per returned series of ``role``, keyed
        by the ``image_series_index`` (``"<index>_<rows>x<cols>"`` if one series has images of
        several sizes), in order of first arrival."""
        return {name: _stack(images) for name, images in _series_groups(self.images, role).items()}


def _series_groups(
    images: list[wire.Image], role: str, *, by_dtype: bool = False
) -> dict[str, list[wire.Image]]:
    """The images of ``role`` by series index and size (and data type), named as in
    :meth:`ReplayResult.series` (``_<dtype>`` appended where one series mixes data types)."""
    groups: dict[tuple[int, tuple[int, ...], str], list[wire.Image]] = {}
    for im in images:
        if _data_role(im) == role:
            dtype = im.data.dtype.str if by_dtype else ""
            key = (int(im.head["image_series_index"]), tuple(im.data.shape), dtype)
            groups.setdefault(key, []).append(im)
    shapes: dict[int, set[tuple[int, ...]]] = {}
    dtypes: dict[tuple[int, tuple[int, ...]], set[str]] = {}
    for index, shape, dtype in groups:
        shapes.setdefault(index, set()).add(shape)
        dtypes.setdefault((index, shape), set()).add(dtype)
    named: dict[str, list[wire.Image]] = {}
    for (index, shape, dtype), members in groups.items():
        name = str(index) if len(shapes[index]) == 1 else f"{index}_{shape[-2]}x{shape[-1]}"
        if len(dtypes[index, shape]) > 1:
            name += f"_{np.dtype(dtype).name}"
        unique, n = name, 1
        while unique in named:  # sizes that differ only in channels or z
            n += 1
            unique = f"{name}_{n}"
        named[unique] = members
    return named


def _roles(images: list[wire.Image]) -> dict[str, str]:
    """File prefix of each DataRole present: images (Image), sd (Quantitative), else the role."""
    roles = {"Image": "images", "Quantitative": "sd"}
    for im in images:
        role = _data_role(im)
        if role not in roles:
            prefix = re.sub(r"[^a-z0-9]+", "_", role.lower()).strip("_") or "other"
            while prefix in roles.values():
                prefix += "_role"
            roles[role] = prefix
    return roles


def _stack(images: list[wire.Image]) -> np.ndarray:
    return np.stack([np.abs(im.data[0, 0]).astype(np.float32) for im in images])


def _data_role(image: wire.Image) -> str:
    if not image.meta_xml:
        return "Image"
    return str(ismrmrd.Meta.deserialize(image.meta_xml).get("DataRole", "Image"))


def print_progress(text: str) -> None:
    """A server progress line on stderr: ``recon-server replay: server: <text>``."""
    print(f"recon-server replay: server: {text}", file=sys.stderr, flush=True)


def _read_replies(
    reader: wire.WireReader, result: ReplayResult, on_progress: Callable[[str], None] | None = None
) -> None:
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
                if msg.text.startswith(PROGRESS_PREFIX):
                    line = msg.text[len(PROGRESS_PREFIX) :].strip()
                    result.progress.append(line)
                    if on_progress is not None:
                        on_progress(line)
                else:
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
    on_progress: Callable[[str], None] | None = None,
) -> ReplayResult:
    """Send one raw scan and collect the replies (does not raise on server errors; ConnectionError
    when the server cannot be reached). ``progress``: a bar of the acquisitions sent;
    ``on_progress(text)``: each server progress line as it arrives."""
    result = ReplayResult()
    with connect(host, port, timeout_s) as sock:
        rfile = sock.makefile("rb", buffering=1 << 20)
        reader = wire.WireReader(rfile, limits)
        replies = threading.Thread(target=_read_replies, args=(reader, result, on_progress), daemon=True)
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
            log.debug("sending stopped: %s", exc)  # reported once, with the replies
            result.errors.append(f"sending stopped: {exc}")
        result.bytes_sent = writer.bytes_written
        replies.join(timeout_s)
        for stream in (out, rfile):
            try:
                stream.close()
            except OSError:
                pass
    return result


def connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """A TCP connection to the server; ConnectionError ``cannot connect to HOST:PORT: why``."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        why = "connection refused"
    except socket.gaierror as exc:
        why = f"unknown host ({exc.strerror or exc})"
    except TimeoutError:
        why = f"no answer within {timeout_s:g} s"
    except OSError as exc:
        text = exc.strerror or str(exc)
        why = text[:1].lower() + text[1:]
    raise ConnectionError(f"cannot connect to {address}: {why}")


def to_ismrmrd_images(images: list[wire.Image]) -> list[ismrmrd.Image]:
    """Convert decoded wire images to ismrmrd-python images (for HDF5 output)."""
    return [
        ismrmrd.Image(head=im.head.tobytes(), attribute_string=im.meta_xml, data=im.data) for im in images
    ]


def save_images(result: ReplayResult, out_dir: Path) -> list[Path]:
    """Write every returned image into ``out_dir`` and return the paths (also kept in
    ``result.files``): ``images_<series>.npy`` per image series, ``sd_<series>.npy`` per SD
    map series (``<role>_<series>.npy`` for other DataRoles), ``images.npy`` / ``sd.npy`` with all
    of them when they share one size (a stale one from an earlier replay is removed otherwise),
    and ``images.h5`` with every image (group ``images``, or when sizes differ one group per
    series named like the ``.npy`` files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    roles = _roles(result.images)
    for role, prefix in roles.items():
        for name, array in result.series(role).items():
            path = out_dir / f"{prefix}_{name}.npy"
            np.save(path, array)
            written.append(path)
        combined = out_dir / f"{prefix}.npy"
        images = [im for im in result.images if _data_role(im) == role]
        if images and len({im.data.shape[-2:] for im in images}) == 1:
            np.save(combined, _stack(images))
            written.append(combined)
        else:
            combined.unlink(missing_ok=True)
    if result.images:
        h5 = out_dir / "images.h5"
        h5.unlink(missing_ok=True)
        if len({(im.data.shape, im.data.dtype) for im in result.images}) == 1:
            ismrmrd_io.write_images(h5, to_ismrmrd_images(result.images))
        else:  # an ISMRMRD image group holds one size: one group per series, named as the .npy
            for role, prefix in roles.items():
                for name, members in _series_groups(result.images, role, by_dtype=True).items():
                    ismrmrd_io.write_images(h5, to_ismrmrd_images(members), name=f"{prefix}_{name}")
        written.append(h5)
    result.files = written
    return written


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
    """Replay a raw file, save the images; ReplayError carrying the server's text on failure,
    NoImagesError when the server closed without error and without images, ConnectionError when
    it cannot be reached. ``progress``: the send bar and the server's progress lines on stderr.

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
        on_progress=print_progress if progress else None,
    )
    if result.errors:
        raise ReplayError("; ".join(result.errors))
    if not result.images:
        said = f" (it said: {'; '.join(result.texts)})" if result.texts else ""
        raise NoImagesError(f"the server returned no images{said}")
    save_images(result, out_dir)
    return result
