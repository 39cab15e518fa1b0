"""``recon-server --help``: real defaults only, method names where a method is chosen, a parser
built without torch, one ``main``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from recon_server.cli import data as data_commands
from recon_server.cli import options
from recon_server.cli import train as train_commands
from recon_server.cli.main import build_parser


def _parsers(
    parser: argparse.ArgumentParser, name: str = "recon-server"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _help(*words: str) -> str:
    return dict(_parsers(build_parser()))[" ".join(("recon-server", *words))].format_help()


def test_no_placeholder_defaults_in_any_help() -> None:
    for name, parser in _parsers(build_parser()):
        text = parser.format_help()
        for placeholder in ("(default: None)", "(default: [])", "(default: False)", "(default: ())"):
            assert placeholder not in text, f"{name} --help shows {placeholder}"


def test_real_defaults_are_shown() -> None:
    text = " ".join(_help("evaluate").split())
    assert "(default: 2,4,5,6)" in text and "(default: eval-out)" in text
    assert "(default: 9002)" in " ".join(_help("replay").split())


@pytest.mark.parametrize(
    "words",
    [("recon",), ("replay",), ("evaluate",), ("demo",), ("experiment", "paper")],
)
def test_help_lists_the_methods_where_one_is_chosen(words: tuple[str, ...]) -> None:
    text = "".join(_help(*words).split())  # argparse wraps at hyphens too ("cg-\nsense")
    assert options.METHOD_LIST.replace(" ", "") in text, f"{' '.join(words)} --help lists no methods"


def test_replay_help_says_which_server_host_and_port_name() -> None:
    text = " ".join(_help("replay").split())
    assert "--host HOST address of the MRD stream server (`recon-server serve --host`)" in text
    assert "--port PORT port of the MRD stream server (`recon-server serve --port`) (default: 9002)" in text


def test_torch_free_copies_match_their_sources() -> None:
    from recon_server.data import acquire
    from recon_server.dpm.architecture import MODEL_SIZES
    from recon_server.dpm.precision import CPU_PRECISIONS
    from recon_server.recon.methods import METHODS

    assert options.METHOD_NAMES == tuple(METHODS)
    assert options.CPU_PRECISIONS == CPU_PRECISIONS
    assert train_commands.MODEL_SIZE_NAMES == tuple(sorted(MODEL_SIZES))
    assert data_commands.SUBJECT_FILES == acquire.SUBJECT_FILES
    assert data_commands.DEFAULT_SUBJECT_FILES == acquire.DEFAULT_SUBJECT_FILES


def test_building_the_parser_imports_no_torch() -> None:
    code = (
        "import sys; from recon_server.cli.main import build_parser; build_parser(); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "False", (
        "building the parser imported torch (python -X importtime shows where)"
    )


def test_demo_is_a_subcommand_and_the_only_main_is_recon_server() -> None:
    from recon_server.cli import demo, dicom

    assert not hasattr(demo, "main") and not hasattr(dicom, "main")
    args = build_parser().parse_args(
        ["demo", "--out", "x", "--matrix", "96", "--coils", "4", "--slices", "2"]
    )
    assert args.func is demo.run_demo and (args.matrix, args.coils, args.slices, args.seed) == (
        96,
        4,
        2,
        2026,
    )
    assert args.method is None
