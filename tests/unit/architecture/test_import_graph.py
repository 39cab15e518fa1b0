"""The package's import graph (imports inside functions included) against docs/ARCHITECTURE.md.

No cycle between files, no domain folder importing the command-line package, and no import from
a lower layer to a higher one, in the layer order the architecture page writes down. Imports under
``if TYPE_CHECKING:`` (annotations only, never run) count for the layers but not for file cycles.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "recon_server"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _typing_only(tree: ast.Module) -> set[ast.AST]:
    """The import statements inside ``if TYPE_CHECKING:`` blocks."""
    found: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found.update(n for stmt in node.body for n in ast.walk(stmt))
    return found


def import_graph(*, typing_only: bool = True) -> dict[str, set[str]]:
    """``module -> modules of this package it imports`` (a name imported from a package counts
    as its submodule when there is one); ``typing_only=False`` leaves out TYPE_CHECKING imports."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = set() if typing_only else _typing_only(tree)
        for node in ast.walk(tree):
            if node in skip:
                continue
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == "recon_server")
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] != "recon_server":
                    continue
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in modules else node.module)
        graph[name] = {e for e in edges if e != name and e in modules}
    return graph


def folder(module: str) -> str:
    """``recon_server.service.server`` -> ``service``; top-level modules are their own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "recon_server"


def documented_layers() -> dict[str, int]:
    """The numbered list under "## Layers" in docs/ARCHITECTURE.md: ``N. `a`, `b` ...``."""
    text = ARCHITECTURE.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        m = re.match(r"(\d+)\.\s+(.*)", line.strip())
        if m:
            for name in re.findall(r"`([\w.]+)`", m.group(2).split(":")[0]):
                layers[name] = int(m.group(1))
    return layers


GRAPH = import_graph()
RUNTIME_GRAPH = import_graph(typing_only=False)
LAYERS = documented_layers()


def layer_of(module: str, layers: dict[str, int] = LAYERS) -> int:
    short = module.removeprefix("recon_server.")
    for key in (short, folder(module)):
        if key in layers:
            return layers[key]
    raise AssertionError(f"{module} has no layer in docs/ARCHITECTURE.md")


def file_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def command_line_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {e}" for m, es in graph.items() for e in es if folder(e) == "cli" != folder(m))


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int] = LAYERS) -> list[str]:
    return sorted(
        f"{m} (layer {layer_of(m, layers)}) -> {e} (layer {layer_of(e, layers)})"
        for m, es in graph.items()
        for e in es
        if layer_of(e, layers) > layer_of(m, layers)
    )


def folder_cycles(graph: dict[str, set[str]]) -> list[str]:
    folders: dict[str, set[str]] = {}
    for m, es in graph.items():
        folders.setdefault(folder(m), set()).update(folder(e) for e in es if folder(e) != folder(m))
    return sorted(
        f"{a} <-> {b}" for a, deps in folders.items() for b in deps if a < b and a in folders.get(b, set())
    )


def test_the_layers_cover_every_module() -> None:
    assert len(set(LAYERS.values())) >= 5, LAYERS
    for module in GRAPH:
        layer_of(module)


def test_no_cycle_between_files() -> None:
    cycles = file_cycles(RUNTIME_GRAPH)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_cycle_between_folders() -> None:
    assert not folder_cycles(GRAPH), folder_cycles(GRAPH)


def test_no_domain_folder_imports_the_command_line() -> None:
    assert not command_line_imports(GRAPH), command_line_imports(GRAPH)


def test_imports_go_down_the_layers_only() -> None:
    assert not upward_imports(GRAPH), "\n".join(upward_imports(GRAPH))


def test_each_check_finds_what_it_is_for() -> None:
    """On a made-up graph with one of each fault, every check reports it."""
    bad = {
        "recon_server.scan": {"recon_server.recon.engine"},  # upward
        "recon_server.recon.engine": {"recon_server.cli.main", "recon_server.scan"},  # cli; cycle
        "recon_server.cli.main": set(),
    }
    layers = {"scan": 0, "recon": 2, "cli": 6}
    assert file_cycles(bad) == [
        ["recon_server.recon.engine", "recon_server.scan", "recon_server.recon.engine"]
    ]
    assert command_line_imports(bad) == ["recon_server.recon.engine -> recon_server.cli.main"]
    assert upward_imports(bad, layers) == [
        "recon_server.recon.engine (layer 2) -> recon_server.cli.main (layer 6)",
        "recon_server.scan (layer 0) -> recon_server.recon.engine (layer 2)",
    ]
    assert folder_cycles(bad) == ["recon <-> scan"]
