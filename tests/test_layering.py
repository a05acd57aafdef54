"""How the package's modules lean on each other (issue 14 item 4), read from their import statements.

- no module imports another's private name (`from x import _name`, `x._name`);
- no import cycle among module-level imports;
- library code raises exceptions (FinetuneError and its subclasses), never SystemExit: cli.py maps them
  to exit codes;
- what commands import before any model work (runs, the ratings store) imports no torch, and training
  from feedback does not import the review's HTTP server.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imported(name: str, tree: ast.Module, top_level_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(module, names taken from it, line) for each `finetune` import in `tree`."""
    package = name if (PACKAGE.parent / Path(*name.split("."))).is_dir() else name.rpartition(".")[0]
    found = []
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("finetune"):
                found.append((base, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("finetune")]
    return found


def test_no_module_imports_another_modules_private_names():
    private = []
    for name, tree in modules().items():
        aliases = {}
        for module, names, line in imported(name, tree):
            private += [f"{name}:{line} from {module} import {n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
            aliases.update({n: f"{module}.{n}" for n in names})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                private.append(f"{name}:{node.lineno} {node.value.id}.{node.attr}")
    assert private == []


def test_no_import_cycle_among_module_level_imports():
    """A package importing its own submodules (re-exports), or a module its parent package, is not a cycle."""
    trees = modules()

    def related(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    graph = {}
    for name, tree in trees.items():
        targets = set()
        for module, names, _ in imported(name, tree, top_level_only=True):
            # `from finetune.models import families` imports the submodule finetune.models.families
            targets |= {f"{module}.{n}" for n in names if f"{module}.{n}" in trees} or {module}
        graph[name] = sorted(t for t in targets if t in trees and t != name and not related(t, name))
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_original_layout_does_not_import_the_sdxl_one():
    """The SD 1.x original layout is what SDXL's builds on, not the other way round (it was a cycle)."""
    trees = modules()
    (sdxl,) = [n for n in trees if n.endswith("sdxl_layout")]
    taken = {m for m, _, _ in imported("finetune.models.ldm_layout", trees["finetune.models.ldm_layout"])}
    assert "finetune.models.ldm_layout" in {m for m, _, _ in imported(sdxl, trees[sdxl])}
    assert not {sdxl, "finetune.models.families"} & taken


def test_library_code_raises_exceptions_not_system_exit():
    raised = []
    for name, tree in modules().items():
        if name == "finetune.cli":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(call, ast.Name) and call.id == "SystemExit":
                    raised.append(f"{name}:{node.lineno}")
    assert raised == []


def test_neither_recipe_imports_the_other():
    """The recipes share plain functions (finetune.train.common), not each other (issue 14 item 3)."""
    trees = modules()
    recipes = ("finetune.train.lora", "finetune.train.dpo")
    for recipe in recipes:
        taken = {m for m, _, _ in imported(recipe, trees[recipe])}
        taken |= {f"{m}.{n}" for m, names, _ in imported(recipe, trees[recipe]) for n in names}
        assert not (set(recipes) - {recipe}) & taken, f"{recipe} imports the other recipe"
        assert "finetune.train.common" in taken


def fresh_imports(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["finetune.runs", "finetune.ratings", "finetune.vocab", "finetune.config"])
def test_what_commands_read_first_imports_no_torch(module):
    assert "torch" not in fresh_imports(f"import {module}")


def test_training_from_feedback_does_not_import_the_review_server():
    loaded = fresh_imports("import finetune.train.feedback")
    assert "finetune.ratings" in loaded
    assert not {"http.server", "finetune.review.server", "finetune.review"} & loaded
