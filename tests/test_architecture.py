"The package's import graph is the course map: a lesson imports only earlier lessons and infrastructure, never a later one."
import ast
import re
from pathlib import Path

import vlmcourse

PKG = Path(vlmcourse.__file__).parent
INFRA = {"cache", "exercises", "registry"}  # infrastructure: imported by lessons, importing none
MODEL_MODULES = {"clip", "llava", "dpo", "pairs", "preference", "demo"}  # modules that build or train models


def lesson_number(module: str):
    "The number of the notebook a module is exported from (00_world -> 0), or None for infrastructure."
    head = (PKG / f"{module}.py").read_text().split("\n", 5)
    m = next((re.search(r"nbs/(\d+)_\w+\.ipynb", line) for line in head if "File to edit" in line), None)
    return int(m.group(1)) if m else None


def imports(module: str) -> set:
    "Every vlmcourse module `module` imports, at module level or inside a function."
    out = set()
    for node in ast.walk(ast.parse((PKG / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1: out.add((node.module or "").split(".")[0] or None)
            elif node.module and node.module.startswith("vlmcourse."): out.add(node.module.split(".")[1])
            elif node.module == "vlmcourse": out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vlmcourse.")}
    return {m for m in out if m and (PKG / f"{m}.py").exists()} - {module}


MODULES = sorted(p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_"))
GRAPH = {m: imports(m) for m in MODULES}


def test_the_parser_sees_imports():
    assert {"world", "clip", "cache", "registry"} <= GRAPH["llava"]
    assert lesson_number("world") == 0 and lesson_number("llava") == 2 and lesson_number("cache") is None


def test_a_lesson_imports_only_earlier_lessons_and_infrastructure():
    bad = [(m, d) for m in MODULES for d in GRAPH[m]
           if d not in INFRA and (lesson_number(m) is None or lesson_number(d) is None or lesson_number(d) >= lesson_number(m))]
    assert not bad, f"imports against the course order (module -> what it imports): {bad}"


def test_infrastructure_imports_no_lesson():
    for m in INFRA: assert GRAPH[m] <= INFRA, (m, GRAPH[m])


def test_the_world_and_the_yardstick_import_no_model():
    assert not GRAPH["world"] & MODEL_MODULES, GRAPH["world"]
    assert not GRAPH["hallucination"] & MODEL_MODULES, GRAPH["hallucination"]


def test_no_cycles():
    state = {}
    def visit(m, path):
        if state.get(m) == "done": return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in GRAPH[m]: visit(d, path + [m])
        state[m] = "done"
    for m in MODULES: visit(m, [])
