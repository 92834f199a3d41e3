"""The code base's shape: no import cycles among the project's modules, no module over 400 lines (except the
listed ones, which may only shrink)."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("game", "models", "experiments", "launch")
MAX_LINES = 400

OVERSIZE: dict[str, int] = {}
"""Modules allowed over MAX_LINES, with their line counts as `ruff format` lays them out (each may shrink, none may
grow, an entry leaves once its module is back under the limit). Empty since issue 14's splits: a module over the
limit is split instead (plots, students, hf_loader, attacker, compile_check, the task modules, the distillation,
the equilibrium, config, protocol, solver and defenses were)."""


def project_modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file, for every module of the four packages (a package is its __init__.py)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The project modules `name` imports anywhere in its file: top level, inside functions (deferred imports
    still make a cycle, only a hidden one) and under `if TYPE_CHECKING:`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import obj` imports mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_and_its_members():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}, "f": {"g"}, "g": {"f"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["f", "g"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_are_resolved_to_modules():
    modules = project_modules()
    assert imports_of("experiments.cli", modules["experiments.cli"], modules) >= {
        "experiments.io",
        "experiments.config",
        "experiments.cli_args",
        "game.solver",
        "experiments.train",
    }
    assert "experiments.tasks.arithmetic" in imports_of(
        "experiments.tasks.registry", modules["experiments.tasks.registry"], modules
    )


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    found = cycles(graph)
    assert not found, "import cycles (one module per group must stop importing the others): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_no_module_over_the_line_limit():
    counts = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in project_modules().values()}
    over = {m: n for m, n in counts.items() if n > MAX_LINES and m not in OVERSIZE}
    grew = {m: (OVERSIZE[m], counts[m]) for m in OVERSIZE if counts.get(m, 0) > OVERSIZE[m]}
    done = [m for m in OVERSIZE if counts.get(m, 0) <= MAX_LINES]
    assert not over, f"modules over {MAX_LINES} lines (split them): {over}"
    assert not grew, f"listed oversize modules grew (listed, now): {grew}"
    assert not done, f"back under {MAX_LINES} lines: remove from OVERSIZE in tests/test_structure.py: {done}"


def test_design_doc_sections_cited_by_the_code_exist():
    """Docstrings cite docs/design.md by section ('docs/design.md, "Defenses"'): each cited section is a heading there."""
    headings = {
        line.lstrip("#").strip()
        for line in (ROOT / "docs" / "design.md").read_text().splitlines()
        if line.startswith("#")
    }
    cited = {}
    for path in [*project_modules().values(), *(ROOT / "experiments" / "configs").glob("*.yaml")]:
        for match in re.finditer(r'docs/design\.md[,:]? ((?:"[^"]+"(?:, )?)+)', path.read_text()):
            for section in re.findall(r'"([^"]+)"', match.group(1)):
                cited.setdefault(section, str(path.relative_to(ROOT)))
    assert len(cited) >= 4, cited  # the parser found the citations
    missing = {s: where for s, where in cited.items() if s not in headings}
    assert not missing, f"sections cited but not in docs/design.md: {missing}"
