"""Ingest throughput on loopback: MB/s of raw acquisition data through wire (+ assembly).

Compares, on the same byte stream (CONFIG, HEADER, acquisitions, CLOSE sent by one thread
over a loopback TCP socket):

- recon-server: ``WireReader`` (bounded, buffered ``readinto``) alone, and with the
  ``Assembler`` (line placement + readout-oversampling removal at ``finish``);
- gadgetron-python 1.4.1: ``gadgetron.external.Connection`` iterating the items (its
  reader builds an ``ismrmrd.Acquisition`` per readout), i.e. the read side of its
  pass-through example without echoing the data back.

Usage: python benchmarks/bench_ingest.py [--coils 16] [--readout 512] [--lines 256] [--slices 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import threading
import time

import numpy as np
import torch
from gadgetron.external import Connection
from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)

from recon_server.data.ismrmrd_io import new_acquisition_headers
from recon_server.mrd import wire
from recon_server.mrd.assemble import Assembler

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
    coils: int, readout: int, lines: int, slices: int
) -> tuple[str, list[wire.Acquisition], int]:
    rng = np.random.default_rng(0)
    header = HEADER.format(
        ex=readout, rx=readout // 2, ny=lines, nym=lines - 1, nyc=lines // 2, slm=slices - 1
    )
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


def _send(port: int, header: str, acqs: list[wire.Acquisition]) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        out = sock.makefile("wb", buffering=1 << 20)
        writer = wire.WireWriter(out)
        writer.send(wire.ConfigText("<configuration/>"), flush=False)
        writer.send(wire.Header(header), flush=False)
        for acq in acqs:
            writer.send(acq, flush=False)
        writer.send(wire.Close())
        out.close()
        sock.recv(1)  # wait for the receiver to finish


def run(kind: str, header: str, acqs: list[wire.Acquisition]) -> float:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    sender = threading.Thread(target=_send, args=(port, header, acqs))
    sender.start()
    conn, _ = server.accept()
    t0 = time.perf_counter()
    if kind == "gadgetron-python":
        gt = Connection(conn)
        count = sum(1 for _ in gt)
        assert count == len(acqs)
    else:
        reader = wire.WireReader(conn.makefile("rb", buffering=1 << 20))
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
            (scan,) = asm.finish()
            assert scan.kspace.shape[-1] == acqs[0].data.shape[1] // 2  # oversampling removed
        assert count == len(acqs)
    elapsed = time.perf_counter() - t0
    conn.sendall(b"x")
    conn.close()
    server.close()
    sender.join()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coils", type=int, default=16)
    p.add_argument("--readout", type=int, default=512, help="samples per readout (2x oversampled)")
    p.add_argument("--lines", type=int, default=256)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    header, acqs, nbytes = build_stream(args.coils, args.readout, args.lines, args.slices)
    print(f"command: {' '.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {cpu_model()} ({os.cpu_count()} cores), "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, device cpu"
    )
    print(
        f"data: {len(acqs)} readouts x {args.coils} coils x {args.readout} samples = {nbytes / 1e6:.0f} MB "
        f"of complex64 over loopback TCP; best of {args.repeats}\n"
    )
    print("| reader | seconds | MB/s |")
    print("|---|---|---|")
    for kind in ("wire only", "wire + assembly", "gadgetron-python"):
        best = min(run(kind, header, acqs) for _ in range(args.repeats))
        print(f"| {kind} | {best:.3f} | {nbytes / 1e6 / best:.0f} |")


if __name__ == "__main__":
    main()
