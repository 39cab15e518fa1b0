"""Progress of the long commands on stderr: ``recon`` (slices), ``replay`` (the server's PROGRESS
texts), ``simulate`` (subjects, and a warning for a slab without lesion voxels), ``evaluate``
(cases)."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from recon_server.cli.main import main
from recon_server.cli.scans import ProgressLine
from recon_server.mrd import ismrmrd_io, replay, wire
from recon_server.recon.pipeline import Progress

RECON_LINE = re.compile(
    r"^recon-server recon: \S+ zero-filled: slice (\d+)/(\d+), [0-9.]+ s elapsed, [0-9.]+ s/slice$"
)


def test_recon_prints_slices_done_elapsed_and_per_slice_time(
    shepp_full: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["recon", str(shepp_full), "--out", str(tmp_path / "o"), "--method", "zero-filled"]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = [m for m in map(RECON_LINE.match, err) if m]
    assert lines, err
    done, total = lines[-1].groups()
    assert done == total  # the last line reports the whole volume
    assert (
        main(
            [
                "recon",
                str(shepp_full),
                "--out",
                str(tmp_path / "q"),
                "--method",
                "zero-filled",
                "--no-progress",
            ]
        )
        == 0
    )
    assert not any(map(RECON_LINE.match, capsys.readouterr().err.splitlines()))


def test_recon_progress_lines_and_terminal_line() -> None:
    lines = io.StringIO()
    sink = ProgressLine("recon", lines)
    for done in (1, 2):
        sink(Progress(label="FLAIR", method="dps-fast", done=done, total=2, elapsed_s=4.0 * done))
    assert lines.getvalue() == (
        "recon-server recon: FLAIR dps-fast: slice 1/2, 4.0 s elapsed, 4.00 s/slice\n"
        "recon-server recon: FLAIR dps-fast: slice 2/2, 8.0 s elapsed, 4.00 s/slice\n"
    )

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    sink = ProgressLine("recon", term)
    sink(Progress(label="FLAIR", method="dps-fast", done=9, total=10, elapsed_s=36.0))
    sink(Progress(label="FLAIR", method="dps-fast", done=10, total=10, elapsed_s=40.0))
    sink.close()  # nothing more: the finished line already ended
    first = "recon-server recon: FLAIR dps-fast: slice 9/10, 36.0 s elapsed, 4.00 s/slice"
    second = "recon-server recon: FLAIR dps-fast: slice 10/10, 40.0 s elapsed, 4.00 s/slice"
    assert term.getvalue() == f"\r{first}\r{second}\n"


PROGRESS = [
    "FLAIR dps-fast: slice 1/2, 4.0 s elapsed, 4.00 s/slice",
    "FLAIR dps-fast: slice 2/2, 8.0 s elapsed, 4.00 s/slice",
]


def test_replay_prints_the_servers_progress(
    fake_server, make_image, minimal_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    progress = [wire.Text(f"PROGRESS {text}") for text in PROGRESS]
    reply = [*progress, make_image(1), wire.Text("OK")]
    server = fake_server(reply)
    out = tmp_path / "out"
    assert main(["replay", str(minimal_raw), "--port", str(server.port), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if line.startswith("recon-server replay: server: ")]
    assert said == [f"recon-server replay: server: {text}" for text in PROGRESS]
    assert "recon-server replay: 1 images ->" in captured.out
    assert np.load(out / "images.npy").shape == (1, 8, 8)

    server = fake_server(reply)
    argv = ["replay", str(minimal_raw), "--port", str(server.port), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "server:" not in capsys.readouterr().err


def test_progress_texts_arrive_while_the_server_works_and_stay_apart(
    fake_server, make_image, minimal_raw: Path
) -> None:
    arrived = threading.Event()
    # The server sends the image only after the client has seen the progress line.
    reply = [wire.Text(f"PROGRESS {PROGRESS[0]}"), arrived, make_image(1), wire.Text("OK done")]
    server = fake_server(reply)
    seen: list[str] = []

    def on_progress(text: str) -> None:
        seen.append(text)
        arrived.set()

    raw = ismrmrd_io.read_raw(minimal_raw)
    result = replay.stream_scan(
        raw, host="127.0.0.1", port=server.port, progress=False, on_progress=on_progress, timeout_s=30
    )
    server.close()
    assert server.waited == [True]
    assert seen == [PROGRESS[0]] and result.progress == [PROGRESS[0]]
    assert result.texts == ["OK done"] and result.errors == [] and len(result.images) == 1


# 64x64, 4 coils, 2 slices: seed 7, subjects 100 and 101 (as tests/unit/evaluate); sub-100's one
# lesion lies outside its 2-slice slab, sub-101's inside.
SIMULATE = [
    "simulate", "--subjects", "2", "--first-subject", "100", "--seed", "7", "--contrast", "FLAIR",
    "--lesions", "--lesion-count", "1", "--matrix", "64", "--slices", "2", "--coils", "4",
    "--accel", "2", "--snr", "40", "--oversampling", "1", "--files", "reference,truth", "--preview",
]  # fmt: skip


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The subjects of :data:`SIMULATE` and what ``simulate`` printed on stderr."""
    out = tmp_path_factory.mktemp("sim") / "subjects"
    with pytest.MonkeyPatch.context() as patch:
        err = io.StringIO()
        patch.setattr("sys.stderr", err)
        assert main([*SIMULATE, "--out", str(out)]) == 0
    return out, err.getvalue()


def test_simulate_prints_subjects_done_and_warns_of_a_slab_without_lesions(
    simulated: tuple[Path, str],
) -> None:
    out, err = simulated
    lines = err.splitlines()
    progress = [line for line in lines if line.startswith("recon-server simulate: subject ")]
    assert len(progress) == 2, err
    assert re.match(
        r"^recon-server simulate: subject 1/2: sub-100 \(FLAIR\) in [0-9.]+ s, [0-9.]+ s elapsed$",
        progress[0],
    )
    assert progress[1].startswith("recon-server simulate: subject 2/2: sub-101 (FLAIR) in ")
    warnings = [line for line in lines if "warning" in line]
    assert warnings == [
        "recon-server simulate: warning: sub-100: the slab holds no lesion voxels "
        "(1 lesion(s) drawn, none inside the 2 slices)"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["preview.png", "sub-100", "sub-101"]
    assert lines[-1] == f"recon-server simulate: preview: {out / 'preview.png'}"
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_prints_cases_done(
    simulated: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _ = simulated
    argv = ["evaluate", "--data", str(data), "--accel", "2", "--methods", "zero-filled,cg-sense"]
    assert main([*argv, "--out", str(tmp_path / "ev")]) == 0
    cases = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("recon-server evaluate:")
    ]
    assert [re.sub(r"NRMSE [0-9.]+ \([0-9.]+ s\)", "NRMSE x (t s)", line) for line in cases] == [
        "recon-server evaluate: case 1/4: sub-100 R=2 zero-filled: NRMSE x (t s)",
        "recon-server evaluate: case 2/4: sub-100 R=2 cg-sense: NRMSE x (t s)",
        "recon-server evaluate: case 3/4: sub-101 R=2 zero-filled: NRMSE x (t s)",
        "recon-server evaluate: case 4/4: sub-101 R=2 cg-sense: NRMSE x (t s)",
    ]
