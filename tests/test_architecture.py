"""The structure the code keeps: dependencies run one way (stages -> rlhf, never back; no import
cycle between rlhf's packages), algorithms import only torch, nothing rebinds a module's
forward, importing a module sets no environment variable, and a stage's `main` stays a short
recipe. Imports are read from the source (every `import`, also inside functions), so a lazy
import cannot hide an edge."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "rlhf"
STDLIB = set(sys.stdlib_module_names)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    """Every module `path` imports, at any depth of its code."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def unit(module: str) -> str:
    """The package a module belongs to for the dependency rule: rlhf.<package> (a top-level
    module such as rlhf.config is its own unit)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in LIBRARY.rglob("*.py"):
        source = unit(module_name(path))
        graph.setdefault(source, set())
        for target in imports(path):
            if target.startswith("rlhf.") and unit(target) != source:
                graph[source].add(unit(target))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_library_never_imports_the_stages_except_the_cli_entry_point():
    offenders = [f"{path.relative_to(REPO)} imports {name}" for path in LIBRARY.rglob("*.py")
                 if path != LIBRARY / "cli.py" for name in imports(path) if name == "stages" or name.startswith("stages.")]
    assert offenders == []


def test_no_import_cycle_between_packages():
    assert cycles(package_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_strategy_interface_does_not_know_its_implementations():
    names = imports(LIBRARY / "distributed" / "strategy.py")
    assert not [n for n in names if n.split(".")[-1] in ("single", "deepspeed", "fsdp", "group", "factory")]


def test_roles_and_training_are_independent_and_neither_imports_ray():
    # Roles own their update step (rlhf/roles/update.py); the run context and the loop's glue
    # (rlhf/training) know no role. Both sit below the Ray layer.
    for package, forbidden in (("roles", ("rlhf.ray", "rlhf.training")), ("training", ("rlhf.roles", "rlhf.ray"))):
        names = [n for path in (LIBRARY / package).rglob("*.py") for n in imports(path)]
        assert not [n for n in names if n.startswith(forbidden)], package


def test_algorithms_import_only_torch_and_the_standard_library():
    for path in (LIBRARY / "algorithms").rglob("*.py"):
        for name in imports(path):
            top = name.split(".")[0]
            assert top in STDLIB or top == "torch" or name.startswith("rlhf.algorithms"), f"{path.name}: {name}"


def test_nothing_rebinds_a_module_forward():
    offenders = []
    for path in [*LIBRARY.rglob("*.py"), *(REPO / "stages").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "forward":
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
                if (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute)
                        and target.value.attr == "__dict__"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_importing_any_module_sets_no_environment_variable():
    modules = sorted(module_name(p) for p in LIBRARY.rglob("*.py") if p.name != "__main__.py")
    modules += sorted(module_name(p) for p in (REPO / "stages").glob("*.py"))
    script = (
        "import importlib, json, os, sys\n"
        "before = dict(os.environ)\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        "after = dict(os.environ)\n"
        "print(json.dumps({k: after.get(k) for k in set(before) | set(after) if before.get(k) != after.get(k)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "TOKENIZERS_PARALLELISM")}
    done = subprocess.run([sys.executable, "-c", script, *modules], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    changed = json.loads(done.stdout.strip().splitlines()[-1])
    # Libraries we import may set their own variables; none of ours is touched at import.
    ours = {k: v for k, v in changed.items() if k.startswith(("RLHF_", "DS_", "OMP_", "TOKENIZERS_", "RANK",
                                                               "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    assert ours == {}


def _function_lines(path: Path, name: str) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return function.end_lineno - function.lineno + 1


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "dpo", "pipeline"])
def test_a_stage_main_is_a_short_recipe(stage):
    assert _function_lines(REPO / "stages" / f"{stage}.py", "main") <= 85


def test_every_registered_stage_is_a_module_with_a_main():
    from stages import STAGES

    for name, stage in STAGES.items():
        assert stage.name == name and (REPO / (stage.module.replace(".", "/") + ".py")).is_file()
        assert "def main(" in (REPO / (stage.module.replace(".", "/") + ".py")).read_text(encoding="utf-8")
