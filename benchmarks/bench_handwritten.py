"""Hand-written pieces vs the libraries that could replace them (README "Dependency notes").

    .venv/bin/python benchmarks/bench_handwritten.py
    .venv/bin/python benchmarks/bench_handwritten.py --repeats 31 --records 20000

1. Wavelets: ``recon.wavelets.wavelet_forward`` / ``wavelet_inverse`` (orthogonal periodic DWT in
   torch, batched, complex) against PyWavelets (``wavedec2``/``waverec2``,
   ``mode="periodization"``, on the tensor's NumPy view) and ptwt (``wavedec2``/``waverec2``
   ``mode="periodic"``, and ``MatrixWavedec2``/``MatrixWaverec2`` with orthogonalised boundary
   wavelets). ptwt takes real tensors only, so complex data go in as re/im planes, as ours does
   internally. ``--batch`` complex64 images ``--size`` x ``--size``, ``--wavelet``, ``--levels``:
   median time of forward + inverse (including the conversions each needs from and to a complex
   torch tensor; the peers interleaved so that a busy machine slows all alike), the relative
   reconstruction error ``||x - W^-1 W x|| / ||x||``, the energy ratio ``||W x|| / ||x||`` (1 for an
   orthogonal transform, which the FISTA shrinkage needs), the number of coefficients, and whether
   the coefficients are PyWavelets' periodization ones (ours: per level, after a circular shift
   of ``L/2 - 1`` samples, ``L`` the filter length; checked in float64).
2. JSON logs: ``ops.logs.JsonFormatter`` against python-json-logger's ``JsonFormatter`` set up for
   the same fields (format string, ``rename_fields``, UTC time with milliseconds), with
   ``json_ensure_ascii`` True (its default) and False. Time per record (a typical record, median
   over repeats of ``--records`` formats); whether every hostile record (newlines, ESC, C1, DEL,
   U+2028, bidi controls in the message and the measurement id, a traceback) stays one line for
   ``str.splitlines``, has no raw control character left (``ops.logs.UNSAFE``), decodes to the
   same fields and values as ours, and keeps non-ASCII text as text.
3. HTTP: what ``ops.http.OpsServer`` and prometheus_client's ``start_http_server`` answer on
   ``/healthz``, ``/readyz`` and ``/metrics`` while a readiness check fails (no timing).

A peer that is not installed is skipped with the reason. One torch thread. Prints markdown
tables with the command, the machine and the library versions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from recon_server.machine import describe as describe_machine
from recon_server.ops.logs import UNSAFE, JsonFormatter
from recon_server.recon.sense import SenseOperator
from recon_server.recon.wavelets import (
    WAVELETS,
    _levels,
    conv_wavelet_forward,
    conv_wavelet_inverse,
    wavelet_forward,
    wavelet_inverse,
)


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` times, the functions called in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def quartiles(ts: list[float], scale: float) -> str:
    """``q1-q3`` of ``ts`` times ``scale``, the spread a busy machine adds."""
    q1, _, q3 = statistics.quantiles(ts, n=4)
    return f"{q1 * scale:.1f}-{q3 * scale:.1f}"


# --------------------------------------------------------------------------- wavelets


@dataclass
class WaveletPeer:
    name: str
    forward: Callable[[Tensor], object]  # complex (B, H, W) -> coefficients
    inverse: Callable[[object], Tensor]  # coefficients -> complex (B, H, W)
    coefficients: Callable[[object], list[Tensor | np.ndarray]]  # every coefficient array
    periodization: str
    complex_input: str
    gpu: str
    setup_s: float | None = None


def _planes(x: Tensor) -> Tensor:
    """complex (B, H, W) -> real (B, 2, H, W)."""
    return torch.view_as_real(x).movedim(-1, -3)


def _unplanes(y: Tensor) -> Tensor:
    return torch.view_as_complex(y.movedim(-3, -1).contiguous())


def ours_periodization_error(wavelet: str, levels: int, size: int) -> float:
    """Max |our torch path - pywt periodization| over all levels and bands, ours' input to each level shifted
    circularly by L/2 - 1 samples (float64, complex). NaN without PyWavelets."""
    try:
        import pywt
    except ImportError:
        return float("nan")
    shift = len(WAVELETS[wavelet]) // 2 - 1
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, size, size)) + 1j * rng.standard_normal((2, size, size))
    exact = _levels((size, size), levels, len(WAVELETS[wavelet]))
    approx, details = conv_wavelet_forward(torch.from_numpy(x), wavelet, exact)
    err, a = 0.0, x
    for level in range(len(details)):
        ca, (ch, cv, cd) = pywt.dwt2(
            np.roll(a, (-shift, -shift), axis=(-2, -1)), wavelet, mode="periodization"
        )
        for k, band in enumerate((ch, cv, cd)):
            err = max(err, float(np.abs(details[level][:, k].numpy() - band).max()))
        a = ca
    return max(err, float(np.abs(approx.numpy() - a).max()))


def wavelet_peers(wavelet: str, levels: int, like: Tensor) -> tuple[list[WaveletPeer], list[str]]:
    exact = _levels((like.shape[-2], like.shape[-1]), levels, len(WAVELETS[wavelet]))
    peers = [
        WaveletPeer(
            "ours (`recon.classic` torch convolutions: the CUDA / autograd path)",
            lambda x: conv_wavelet_forward(x, wavelet, exact),
            lambda c: conv_wavelet_inverse(c[0], c[1], wavelet),
            lambda c: [c[0], *c[1]],
            "yes, up to a shift of L/2-1 per level (max diff {ours_err:.1e})",
            "yes",
            "yes (torch)",
        ),
        WaveletPeer(
            "`recon.wavelets.wavelet_forward` on the CPU (PyWavelets inside)",
            lambda x: wavelet_forward(x, wavelet=wavelet, levels=levels),
            lambda c: wavelet_inverse(c[0], c[1], wavelet=wavelet),
            lambda c: [c[0], *c[1]],
            "yes (the same coefficients as the torch path)",
            "yes",
            "CUDA tensors take the torch path",
        ),
    ]
    skipped: list[str] = []
    try:
        import pywt

        def pywt_forward(x: Tensor) -> object:
            return pywt.wavedec2(x.numpy(), wavelet, mode="periodization", level=levels, axes=(-2, -1))

        peers.append(
            WaveletPeer(
                f"PyWavelets {version('PyWavelets')} `periodization`",
                pywt_forward,
                lambda c: torch.from_numpy(pywt.waverec2(c, wavelet, mode="periodization", axes=(-2, -1))),
                lambda c: [c[0], *(band for level in c[1:] for band in level)],
                "yes (the reference)",
                "yes",
                "no (NumPy, CPU only)",
            )
        )
    except ImportError as exc:
        skipped.append(f"PyWavelets: not installed ({exc})")
    try:
        import ptwt

        try:
            ptwt.wavedec2(torch.zeros(1, 16, 16, dtype=torch.complex64), wavelet, mode="periodic", level=1)
            ptwt_complex = "yes"
        except (ValueError, TypeError, RuntimeError) as exc:
            ptwt_complex = f"no ({exc}): re/im planes"

        def ptwt_forward(x: Tensor) -> object:
            return ptwt.wavedec2(_planes(x), wavelet, mode="periodic", level=levels)

        peers.append(
            WaveletPeer(
                f"ptwt {version('ptwt')} `periodic` (conv)",
                ptwt_forward,
                lambda c: _unplanes(ptwt.waverec2(c, wavelet)),
                lambda c: [_unplanes(t) for t in (c[0], *(band for level in c[1:] for band in level))],
                "no: pywt `periodic` (padded, (N+L-1)/2 per level)",
                ptwt_complex,
                "yes (torch)",
            )
        )
        matrix_fwd = ptwt.MatrixWavedec2(wavelet, level=levels)
        matrix_inv = ptwt.MatrixWaverec2(wavelet)
        t0 = time.perf_counter()
        matrix_inv(matrix_fwd(_planes(like)))  # builds the sparse matrices
        setup = time.perf_counter() - t0
        peers.append(
            WaveletPeer(
                f"ptwt {version('ptwt')} `MatrixWavedec2` (boundary)",
                lambda x: matrix_fwd(_planes(x)),
                lambda c: _unplanes(matrix_inv(c)),
                lambda c: [_unplanes(t) for t in (c[0], *(band for level in c[1:] for band in level))],
                "no: boundary wavelets, not periodic",
                ptwt_complex,
                "yes (torch sparse)",
                setup_s=setup,
            )
        )
    except ImportError as exc:
        skipped.append(f"ptwt: not installed ({exc})")
    return peers, skipped


def energy(arrays: list[Tensor | np.ndarray]) -> tuple[float, int]:
    total, count = 0.0, 0
    for a in arrays:
        a = a.numpy() if isinstance(a, Tensor) else a
        total += float(np.sum(np.abs(a.astype(np.complex128)) ** 2))
        count += a.size
    return total, count


def bench_wavelets(args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.size, args.size)
    x = torch.complex(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    peers, skipped = wavelet_peers(args.wavelet, args.levels, x)
    ours_err = ours_periodization_error(args.wavelet, args.levels, args.size)

    def roundtrip(peer: WaveletPeer) -> Callable[[], Tensor]:
        return lambda: peer.inverse(peer.forward(x))

    # Context: the SENSE normal operator that each L1-wavelet (FISTA) iteration applies once.
    maps = torch.complex(
        torch.randn((args.batch, args.coils, args.size, args.size), generator=gen),
        torch.randn((args.batch, args.coils, args.size, args.size), generator=gen),
    )
    op = SenseOperator(
        maps / maps.abs().square().sum(dim=1, keepdim=True).sqrt(), torch.ones(args.size, args.size)
    )
    fns = {p.name: roundtrip(p) for p in peers} | {"normal": lambda: op.normal(x)}
    times = interleaved_times(fns, args.repeats)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    x_energy = float(torch.linalg.vector_norm(x.to(torch.complex128)) ** 2)
    ours_s = medians[peers[0].name]
    print(
        f"### Wavelets: {args.batch} x {args.size}x{args.size} complex64, {args.wavelet}, "
        f"{args.levels} levels, forward + inverse\n"
    )
    print(
        f"| implementation | ms per forward+inverse, median of {args.repeats} (quartiles) | x ours | "
        "reconstruction error | energy ratio | complex coefficients per image | "
        "pywt periodization coefficients | complex input | torch on GPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for peer in peers:
        coeffs = peer.forward(x)
        rec = peer.inverse(coeffs)
        err = float(torch.linalg.vector_norm(rec - x) / torch.linalg.vector_norm(x))
        e, n = energy(peer.coefficients(coeffs))
        secs = medians[peer.name]
        name = peer.name + (f" (matrices built once: {peer.setup_s:.2f} s)" if peer.setup_s else "")
        print(
            f"| {name} | {secs * 1e3:.1f} ({quartiles(times[peer.name], 1e3)}) | {secs / ours_s:.2f} | "
            f"{err:.1e} | {np.sqrt(e / x_energy):.4f} | "
            f"{n // args.batch} | {peer.periodization.format(ours_err=ours_err)} | {peer.complex_input} | "
            f"{peer.gpu} |"
        )
    for reason in skipped:
        print(f"\nskipped {reason}")
    normal = medians["normal"]
    print(
        f"\nimage: {args.size * args.size} pixels; energy ratio = ||W x|| / ||x|| "
        "(1: orthogonal, as the FISTA soft-threshold step assumes). "
        f"Context: one SENSE normal operator A^H A on the same {args.batch} slices with {args.coils} coils "
        f"takes {normal * 1e3:.1f} ms, so our wavelet pair is {ours_s / (ours_s + normal):.0%} of an "
        "L1-wavelet iteration (wavelets + A^H A) here\n"
    )


# --------------------------------------------------------------------------- JSON logs

HOSTILE = 'MID\n{"level": "CRITICAL"}\r\x1b[2J\x85\x7f\u2028\u2029\u202eevil\u2066x\u2069 Müller'


def _record(msg: str, args: tuple[object, ...], measurement_id: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad header\nline two \x1b[31m")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.getLogger("recon_server.service.server").makeRecord(
        "recon_server.service.server", logging.INFO, __file__, 1, msg, args, exc_info
    )
    record.measurement_id = measurement_id  # what ops.logs.ContextFilter adds
    record.peer = "10.0.0.5:4711"
    return record


def json_peers() -> tuple[dict[str, logging.Formatter], list[str]]:
    formatters: dict[str, logging.Formatter] = {"ours (`ops.logs.JsonFormatter`)": JsonFormatter()}
    try:
        from pythonjsonlogger.json import JsonFormatter as LibraryJsonFormatter
    except ImportError as exc:
        return formatters, [f"python-json-logger: not installed ({exc})"]
    for ascii_only in (True, False):
        lib = LibraryJsonFormatter(
            "{asctime}{levelname}{name}{message}{measurement_id}{peer}{threadName}",
            style="{",
            rename_fields={
                "asctime": "time",
                "levelname": "level",
                "name": "logger",
                "threadName": "thread",
                "exc_info": "exception",
            },
            json_ensure_ascii=ascii_only,
        )
        lib.converter = time.gmtime  # type: ignore[assignment]
        lib.default_time_format = "%Y-%m-%dT%H:%M:%S"
        lib.default_msec_format = "%s.%03dZ"
        formatters[f"python-json-logger {version('python-json-logger')}, ensure_ascii={ascii_only}"] = lib
    return formatters, []


def bench_json(args: argparse.Namespace) -> None:
    formatters, skipped = json_peers()
    typical = _record("scan %s reconstructed in %.1f s (%d slices)", ("MID_00042", 3.27, 24), "MID_00042")
    hostile = [
        _record("config %r unknown", (HOSTILE,), HOSTILE),
        _record("plain", (), "MID_1", exc=True),
        _record(HOSTILE, (), "-"),
    ]

    def run(fmt: logging.Formatter) -> Callable[[], None]:
        def go() -> None:
            for _ in range(args.records):
                fmt.format(typical)

        return go

    repeats = max(args.repeats // 3, 3)
    times = interleaved_times({name: run(f) for name, f in formatters.items()}, repeats, 1)
    per_record = {name: [t / args.records for t in ts] for name, ts in times.items()}
    ours_name = next(iter(formatters))
    reference = [json.loads(formatters[ours_name].format(r)) for r in [typical, *hostile]]
    print("### JSON log formatter: one record\n")
    print(
        f"| formatter | us per record, median of {repeats} x {args.records} records (quartiles) | x ours | "
        "one line (`splitlines`) | no raw control character | same fields and values as ours | "
        "non-ASCII kept as text |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, fmt in formatters.items():
        outs = [fmt.format(r) for r in [typical, *hostile]]
        one_line = all(len(o.splitlines()) == 1 for o in outs)
        raw = sorted({f"U+{ord(c):04X}" for o in outs for c in UNSAFE.findall(o)})
        same = [json.loads(o) for o in outs] == reference
        readable = "Müller" in outs[1]
        us = statistics.median(per_record[name]) * 1e6
        ratio = us / (statistics.median(per_record[ours_name]) * 1e6)
        print(
            f"| {name} | {us:.2f} ({quartiles(per_record[name], 1e6)}) | {ratio:.2f} | "
            f"{'yes' if one_line else 'no'} | {'yes' if not raw else 'no: raw ' + ' '.join(raw)} | "
            f"{'yes' if same else 'no'} | {'yes' if readable else 'no (escaped)'} |"
        )
    for reason in skipped:
        print(f"\nskipped {reason}")
    print(
        "\npython-json-logger set up with a 7-field format string, rename_fields and a UTC converter; "
        "measurement_id/peer still come from ops.logs.ContextFilter\n"
    )


# --------------------------------------------------------------------------- HTTP


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback only
            status, ctype, body = resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        status, ctype, body = exc.code, exc.headers.get("Content-Type", ""), exc.read()
    text = " ".join(body.decode(errors="replace").split())
    return f"{status} `{ctype.split(';')[0]}` `{text[:36]}`"


def bench_http() -> None:
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    from recon_server.ops.http import OpsServer

    registry = CollectorRegistry()
    Counter("bench_scans", "scans", registry=registry).inc()
    ops = OpsServer(
        "127.0.0.1", 0, checks={"spool": lambda: (False, "spool not writable")}, registry=registry
    )
    host, port = ops.start()
    httpd, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    lib_port = httpd.server_address[1]
    print(
        "### HTTP: answers while the readiness check fails "
        f"(prometheus_client {version('prometheus_client')})\n"
    )
    print("| path | ours (`ops.http.OpsServer`) | prometheus_client `start_http_server` |")
    print("|---|---|---|")
    try:
        for path in ("/healthz", "/readyz", "/metrics"):
            ours = _get(f"http://{host}:{port}{path}")
            lib = _get(f"http://127.0.0.1:{lib_port}{path}")
            print(f"| {path} | {ours} | {lib} |")
    finally:
        ops.stop()
        httpd.shutdown()
        httpd.server_close()
    print()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--wavelet", default="db4", choices=sorted(WAVELETS))
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--coils", type=int, default=12, help="for the SENSE operator timed as context")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--skip", nargs="*", default=[], choices=("wavelets", "json", "http"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("recon_server").setLevel(logging.WARNING)  # OpsServer's start line
    print(f"command: {' '.join([sys.executable, *sys.argv])}  ")
    print(f"machine: {describe_machine()}  ")
    print(
        f"numpy {np.__version__}, PyWavelets {version('PyWavelets')}, ptwt {version('ptwt')}, "
        f"python-json-logger {version('python-json-logger')}, "
        f"prometheus_client {version('prometheus_client')}\n"
    )
    if "wavelets" not in args.skip:
        bench_wavelets(args)
    if "json" not in args.skip:
        bench_json(args)
    if "http" not in args.skip:
        bench_http()


if __name__ == "__main__":
    main()
