"""The layering of ``mllmcl`` stays true: the import-linter contract of pyproject.toml passes,
every part of the package is in it, and no two parts import each other, however indirectly,
counting every import (also those inside functions)."""

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def _parts_graph():
    graph = grimp.build_graph("mllmcl", cache_dir=None)
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        a = module.split(".")
        for imported in graph.find_modules_directly_imported_by(module):
            b = imported.split(".")
            if len(a) > 1 and len(b) > 1 and a[1] != b[1]:
                edges.setdefault(a[1], set()).add(b[1])
    return graph, edges


def test_import_linter_contract_passes():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_every_part_is_in_the_layers():
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layered = {p.strip().removeprefix("mllmcl.") for line in contract["layers"] for p in line.split("|")}
    graph, _ = _parts_graph()
    parts = {m.split(".")[1] for m in graph.modules if m.count(".") >= 1}
    assert parts == layered, f"parts outside the layers contract: {sorted(parts - layered)}; " \
                             f"layers naming no part: {sorted(layered - parts)}"


def test_no_cycle_between_parts():
    _, edges = _parts_graph()

    def reaches(start: str, goal: str) -> bool:
        todo, seen = [start], set()
        while todo:
            n = todo.pop()
            for m in edges.get(n, ()):
                if m == goal:
                    return True
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return False

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in edges for b in edges[a] if reaches(b, a))
    assert not cycles, cycles


def test_serving_and_data_stay_clear():
    """The issue's two rules, read directly from the import graph (also indirect imports)."""
    graph, _ = _parts_graph()
    for source, forbidden in (("mllmcl.serving", "mllmcl.methods"), ("mllmcl.data", "mllmcl.training"),
                              ("mllmcl.data", "mllmcl.evaluation")):
        chains = graph.find_shortest_chains(importer=source, imported=forbidden)
        assert not chains, f"{source} imports {forbidden}: {sorted(chains)[:3]}"
