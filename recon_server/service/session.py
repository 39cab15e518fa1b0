"""One MRD client stream's preamble and readouts: CONFIG / TEXT / HEADER, then the scan.

The client's choice (``method``, ``samples``; :mod:`recon_server.mrd.client_config`) is checked as
each configuration message arrives; the readouts go to the assembler, to the scan journal as they
arrive, and (without a journal) to memory so that a failed scan can still be kept on disk.
"""

from __future__ import annotations

import logging

from recon_server.mrd import wire
from recon_server.mrd.assemble import Assembler
from recon_server.mrd.client_config import ClientConfigError, json_options, requested_method, text_options
from recon_server.ops import logs as ops_logs
from recon_server.service.config import MAX_POSTERIOR_SAMPLES
from recon_server.service.journal import Journal, JournalEntry
from recon_server.service.stream import read_readouts

log = logging.getLogger(__name__)


def samples_override(options: dict) -> int | None:
    """Posterior samples asked for by the client's JSON (``{"samples": 8}``, a JSON integer), bounded."""
    value = options.get("samples")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_POSTERIOR_SAMPLES:
        raise ClientConfigError(f"samples must be an integer in 1..{MAX_POSTERIOR_SAMPLES}, got {value!r}")
    return value


MAX_CONFIG_MESSAGES = 16  # CONFIG / TEXT messages accepted before the HEADER


class StreamSession:
    """Reads one client stream into scans: config, header, optional JSON, readouts, CLOSE.

    The client's choice (``method``, ``samples``) is checked as each configuration message
    arrives: :class:`ClientConfigError` ends the stream there, before the readouts.
    """

    def __init__(
        self,
        reader: wire.WireReader,
        *,
        keep_acquisitions: bool = False,
        calibration_lines: str = "auto",
        journal: Journal | None = None,
        allowed_methods: frozenset[str] | None = None,
        peer: object = "",
    ) -> None:
        self.reader = reader
        self.journal = journal
        self.entry: JournalEntry | None = None  # this stream's raw data on disk (service.journal)
        self.allowed_methods = allowed_methods  # what a client may ask for (None: any)
        self.peer = peer
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
        if self.method is not None and self.allowed_methods is not None:
            if self.method not in self.allowed_methods:
                raise ClientConfigError(
                    f"method {self.method!r} may not be requested by a client on this server (allowed: "
                    f"{', '.join(sorted(self.allowed_methods))}; the administrator enables more with "
                    "[recon] allowed_client_methods)"
                )
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
        asm = Assembler(
            msg.xml, config=self.options, calibration_lines=self.calibration_lines, limits=reader.limits
        )
        ops_logs.set_measurement(asm.measurement_id)  # every later log line of this stream
        self.assembler = asm
        if self.journal is not None:
            self.entry = self.journal.begin(msg.xml, measurement=asm.measurement_id, peer=str(self.peer))
        read_readouts(
            reader,
            asm,
            on_acquisition=self._keep_readout,
            on_recon_data=self._drop_entry,
            on_text=lambda msg: self._configure(json_options(msg.text)) if asm.n_lines == 0 else None,
        )
        return asm

    def _keep_readout(self, msg: wire.Acquisition) -> None:
        if self.acquisitions is not None:
            self.acquisitions.append(msg)
        if self.entry is not None:
            self.entry.append(msg)

    def _drop_entry(self, msg: wire.ReconData) -> None:
        if self.entry is not None:  # an ISMRMRD raw file holds acquisitions only
            self.entry.remove()
            self.entry = None
