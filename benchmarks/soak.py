"""Soak: thousands of malformed MRD streams, valid scans interleaved, against a child ``serve``.

    cd benchmarks && ../.venv/bin/python soak.py --streams 10000 --valid-every 50

The hostile streams are :class:`recon_server.service.fuzz.Mutator`'s (random bytes, truncations,
bit flips, hostile header fields and indices, huge lengths, bad XML, NaN, unknown ids, bad order,
hostile JSON, hostile measurement ids), sent by ``--clients`` parallel clients to
``recon-server serve`` (zero-filled, failed scans kept). The table gives the command, the
machine, server deaths, peak and final RSS / threads / file descriptors of the server, the
failed-scan files against the streams told "raw data kept", and the valid scans that came back
equal to the first one against those sent. Exit status 1 when the server died, a valid scan
came back wrong or missing, or the failed-scan files do not match what the clients were told.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import IO

import numpy as np

from recon_server.machine import describe
from recon_server.mrd import wire
from recon_server.service import fuzz

KEPT = "raw data kept on the server as "


CLOSE = fuzz.encode([wire.Close()])


def send(address: tuple[str, int], payload: bytes, timeout: float) -> tuple[list[str], list[wire.Image]]:
    """``fuzz.exchange``, half-closing unless the stream ends in CLOSE (a half-closed client of a
    valid scan counts as gone)."""
    return fuzz.exchange(address, payload, timeout=timeout, half_close=not payload.endswith(CLOSE))


class Server:
    """``recon-server serve`` in a child process with its own config, logs and failed-scans folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.failed = folder / "failed"
        self.config = folder / "recon-server.toml"
        self.config.write_text(
            textwrap.dedent(
                f"""
                [server]
                port = 0
                socket_timeout_s = 10
                stream_deadline_s = 60
                max_connections = 16
                failed_scans_dir = "{self.failed}"
                [recon]
                default_method = "zero-filled"
                [ops]
                http_port = 0
                """
            )
        )
        self.deaths = 0
        self.proc: subprocess.Popen | None = None
        self.log: IO[str]
        self.address: tuple[str, int] = ("", 0)
        self.start()

    def start(self) -> None:
        log = self.log = (self.folder / "serve.log").open("a")
        cmd = [sys.executable, "-m", "recon_server.cli", "serve", "--config", str(self.config)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if m := re.search(r"MRD stream server on ([\d.]+):(\d+)", line):
                self.address = (m.group(1), int(m.group(2)))
                break
        else:
            raise SystemExit(f"serve did not start; see {self.folder / 'serve.log'}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def check(self) -> None:
        """Count a death and start a new server (so the soak goes on and reports it)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            self.deaths += 1
            self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.log.close()


class Sampler(threading.Thread):
    """RSS (and its peak), threads and open file descriptors of the server, every 0.2 s."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.peak = {"rss": 0, "threads": 0, "fds": 0}
        self.last = dict(self.peak)
        self.done = threading.Event()

    def sample(self) -> None:
        assert self.server.proc is not None
        pid = self.server.proc.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        except OSError:
            return
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        now = {
            "rss": int(fields["VmRSS"].split()[0]) * 1024,
            "threads": int(fields["Threads"]),
            "fds": fds,
        }
        hwm = int(fields["VmHWM"].split()[0]) * 1024
        self.last = now
        self.peak = {k: max(self.peak[k], now[k]) for k in now}
        self.peak["rss"] = max(self.peak["rss"], hwm)

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.sample()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=10_000, help="malformed streams in all")
    ap.add_argument("--valid-every", type=int, default=50, help="one valid scan after this many")
    ap.add_argument("--seeds", default="1,2,3,4", help="mutator seeds, used in turn")
    ap.add_argument("--clients", type=int, default=2, help="parallel clients")
    ap.add_argument("--timeout", type=float, default=60.0, help="client socket timeout (s)")
    args = ap.parse_args()

    scan = fuzz.valid_scan()
    seeds = [int(s) for s in args.seeds.split(",")]
    mutators = [iter(fuzz.Mutator(seed, scan)) for seed in seeds]
    with tempfile.TemporaryDirectory(prefix="recon-soak-") as tmp:
        server = Server(Path(tmp))
        sampler = Sampler(server)
        sampler.sample()
        start_rss = sampler.last["rss"]
        sampler.start()
        texts, images = send(server.address, fuzz.stream(scan), args.timeout)
        if texts or len(images) != 1:
            raise SystemExit(f"the first valid scan failed: {texts}")
        reference = images[0].data
        lock = threading.Lock()
        work = iter(range(args.streams))
        kinds: collections.Counter[str] = collections.Counter()
        outcomes: collections.Counter[str] = collections.Counter()
        told: list[str] = []
        failing_with_data = [0]  # hostile streams that carried a header and readouts, and failed
        valid = {"sent": 0, "correct": 0}
        t0 = time.perf_counter()

        def client() -> None:
            while True:
                with lock:
                    i = next(work, None)
                    if i is None:
                        return
                    item = next(mutators[i % len(mutators)])
                    kinds[item.kind] += 1
                try:
                    texts, images = send(server.address, item.payload, args.timeout)
                except OSError as exc:  # could not even connect: the server is down
                    texts, images = [f"client error {type(exc).__name__}"], []
                failed = any(t.startswith("ERR ") for t in texts)
                with lock:
                    outcomes["images" if images and not texts else "error" if failed else "closed"] += 1
                    told.extend(t.rsplit(KEPT, 1)[1].rstrip(")") for t in texts if KEPT in t)
                    failing_with_data[0] += failed and item.sends_data
                if (i + 1) % args.valid_every == 0:
                    v_texts, v_images = send(server.address, fuzz.stream(scan), args.timeout)
                    ok = not v_texts and len(v_images) == 1 and np.array_equal(v_images[0].data, reference)
                    with lock:
                        valid["sent"] += 1
                        valid["correct"] += ok
                with lock:
                    server.check()

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        time.sleep(1.0)
        sampler.done.set()
        sampler.join()
        time.sleep(0.5)
        sampler.sample()
        server.check()
        files = sorted(p.name for p in server.failed.glob("*.h5")) if server.failed.is_dir() else []
        server.stop()

    mb = 1 / 2**20
    rows = [
        ("command", " ".join(["python", *sys.argv])),
        ("machine", describe()),
        (
            "malformed streams",
            f"{args.streams} in {seconds:.0f} s ({args.streams / seconds:.0f}/s), "
            f"{args.clients} clients, seeds {args.seeds}",
        ),
        ("kinds", ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))),
        ("outcomes", ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items()))),
        ("server deaths", str(server.deaths)),
        (
            "RSS start / peak / final (MiB)",
            f"{start_rss * mb:.0f} / {sampler.peak['rss'] * mb:.0f} / {sampler.last['rss'] * mb:.0f}",
        ),
        ("threads peak / final", f"{sampler.peak['threads']} / {sampler.last['threads']}"),
        ("open fds peak / final", f"{sampler.peak['fds']} / {sampler.last['fds']}"),
        (
            "failed-scan files / failing streams that sent data / told 'kept'",
            f"{len(files)} / {failing_with_data[0]} / {len(told)} (distinct names {len(set(told))}, "
            f"the names told are the files: {set(told) == set(files)})",
        ),
        ("valid scans correct / sent", f"{valid['correct']} / {valid['sent']}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'soak'.ljust(width)} | result |")
    print(f"|{'-' * (width + 2)}|---|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    ok = (
        server.deaths == 0
        and valid["correct"] == valid["sent"]
        and len(files) == len(told) == len(set(told)) == failing_with_data[0]
        and set(told) == set(files)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
