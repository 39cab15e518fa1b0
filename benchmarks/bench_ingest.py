"""Ingest throughput on loopback: MB/s of raw acquisition data through wire (+ assembly).

Compares, on the same byte stream (CONFIG, HEADER, acquisitions, CLOSE, serialized once and
sent with ``sendall`` by a separate interpreter over a loopback TCP socket, as a scanner on another
host would: the sender's own work does not compete for the receiver's interpreter lock):

- recon-server: ``WireReader`` (bounded, buffered ``readinto``) alone, and with the
  ``Assembler`` (line placement + readout-oversampling removal in batches of 64 lines as they
  arrive); "after the last line" is ``Assembler.finish`` alone (the last partial batch): the
  latency the reconstruction waits for once the scan has ended. Each row repeats the scan in one
  process, as a server receives scan after scan (k-space buffers are reused from the second);
- gadgetron-python 1.4.1: ``gadgetron.external.Connection`` iterating the items (its
  reader builds an ``ismrmrd.Acquisition`` per readout), i.e. the read side of its
  pass-through example without echoing the data back.

Usage: python benchmarks/bench_ingest.py [--coils 16] [--readout 512] [--lines 256] [--slices 8]
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gadgetron.external import Connection

from recon_server.machine import describe as describe_machine
from recon_server.mrd import wire
from recon_server.mrd.assemble import Assembler
from recon_server.mrd.ismrmrd_io import new_acquisition_headers

HEADER = """<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
<experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>
<encoding><encodedSpace><matrixSize><x>{ex}</x><y>{ny}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>480</x><y>240</y><z>5</z></fieldOfView_mm></encodedSpace>
<reconSpace><matrixSize><x>{rx}</x><y>{ny}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>240</x><y>240</y><z>5</z></fieldOfView_mm></reconSpace>
<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{nym}</maximum><center>{nyc}</center>
</kspace_encoding_step_1><slice><minimum>0</minimum><maximum>{slm}</maximum><center>0</center></slice>
</encodingLimits><trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"""


def build_stream(
    coils: int, readout: int, lines: int, slices: int, *, recon_x: int
) -> tuple[str, list[wire.Acquisition], int]:
    rng = np.random.default_rng(0)
    header = HEADER.format(ex=readout, rx=recon_x, ny=lines, nym=lines - 1, nyc=lines // 2, slm=slices - 1)
    n = lines * slices
    heads = new_acquisition_headers(n)
    heads["idx"]["kspace_encode_step_1"] = np.tile(np.arange(lines), slices)
    heads["idx"]["slice"] = np.repeat(np.arange(slices), lines)
    heads["center_sample"] = readout // 2
    base = (rng.standard_normal((coils, readout)) + 1j * rng.standard_normal((coils, readout))).astype(
        np.complex64
    )
    empty = np.zeros((readout, 0), np.float32)
    acqs = [wire.Acquisition(heads[i], base, empty) for i in range(n)]
    return header, acqs, n * coils * readout * 8


def serialize(header: str, acqs: list[wire.Acquisition]) -> bytes:
    """The whole stream as the scanner would send it."""
    buf = io.BytesIO()
    writer = wire.WireWriter(buf)
    writer.send(wire.ConfigText("<configuration/>"), flush=False)
    writer.send(wire.Header(header), flush=False)
    for acq in acqs:
        writer.send(acq, flush=False)
    writer.send(wire.Close())
    return buf.getvalue()


# The scanner: a separate interpreter that connects, sends the file's bytes and waits for one byte.
SENDER = """
import socket, sys
data = open(sys.argv[2], "rb").read()
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=120) as sock:
    sock.sendall(data)
    sock.recv(1)
"""


def run(kind: str, stream: Path, n_acqs: int, recon_x: int) -> tuple[float, float]:
    """Seconds from the first byte to the last item (and to the scans), and of ``finish`` alone."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(120)
    port = server.getsockname()[1]
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(port), str(stream)])
    conn, _ = server.accept()
    conn.settimeout(120)
    t0 = time.perf_counter()
    finish = 0.0
    if kind == "gadgetron-python":
        gt = Connection(conn)
        count = sum(1 for _ in gt)
        assert count == n_acqs
    else:
        rfile = conn.makefile("rb", buffering=1 << 20)
        reader = wire.WireReader(rfile)
        first = reader.read_message()
        assert isinstance(first, wire.ConfigText)
        head = reader.read_message()
        assert isinstance(head, wire.Header)
        asm = Assembler(head.xml) if kind == "wire + assembly" else None
        count = 0
        for msg in reader:
            count += 1
            if asm is not None:
                asm.add(msg)  # type: ignore[arg-type]
        if asm is not None:
            t_finish = time.perf_counter()
            (scan,) = asm.finish()
            finish = time.perf_counter() - t_finish
            assert scan.kspace.shape[-1] == recon_x  # oversampling removed
        assert count == n_acqs
        rfile.close()
    elapsed = time.perf_counter() - t0
    conn.sendall(b"x")
    conn.close()
    server.close()
    if sender.wait(timeout=120) != 0:
        raise RuntimeError(f"sender process exited with {sender.returncode}")
    return elapsed, finish


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coils", type=int, default=16)
    p.add_argument("--readout", type=int, default=512, help="samples per readout (2x oversampled)")
    p.add_argument("--lines", type=int, default=256)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    recon_x = args.readout // 2
    tmp = tempfile.TemporaryDirectory()
    streams = {}
    for name, readout in (("oversampled", args.readout), ("recon width", recon_x)):
        header, acqs, nbytes = build_stream(args.coils, readout, args.lines, args.slices, recon_x=recon_x)
        path = Path(tmp.name) / f"{readout}.bin"
        path.write_bytes(serialize(header, acqs))
        streams[name] = (path, len(acqs), nbytes)
    print(f"command: {' '.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(f"machine: {describe_machine()}; device cpu")
    n_acqs, nbytes = streams["oversampled"][1:]
    print(
        f"data: {n_acqs} readouts x {args.coils} coils x {args.readout} samples (2x readout oversampling) = "
        f"{nbytes / 1e6:.0f} MB of complex64 over loopback TCP; last row: the same scan with readouts "
        f"already at the recon width {recon_x} (oversampling removed upstream); {args.repeats} runs each\n"
    )
    print("| reader | readout | best (s) | MB/s (best) | MB/s (median) | after the last line (s) |")
    print("|---|---|---|---|---|---|")
    rows = [
        ("wire only", "oversampled"),
        ("wire + assembly", "oversampled"),
        ("gadgetron-python", "oversampled"),
        ("wire + assembly", "recon width"),
    ]
    for kind, name in rows:
        path, n_acqs, nbytes = streams[name]
        runs = sorted(run(kind, path, n_acqs, recon_x) for _ in range(args.repeats))
        (best, finish), median = runs[0], runs[len(runs) // 2][0]
        after = f"{finish:.3f}" if kind == "wire + assembly" else "-"
        mb = nbytes / 1e6
        print(f"| {kind} | {name} | {best:.3f} | {mb / best:.0f} | {mb / median:.0f} | {after} |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
