"""The package's import graph has no cycles, counting imports inside functions too: a cycle is not hidden by
moving one of its imports into a function (read from the source, nothing is imported)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("blipdiff_jax", "convert")


def _modules() -> dict[str, str]:
    modules = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    modules[module.removesuffix(".__init__")] = path
    return modules


def _imported(module: str, path: str, node, modules) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for _ in range(max(node.level - 1, 0)):
        package = package.rsplit(".", 1)[0]
    base = (package + "." + node.module if node.module else package) if node.level else node.module
    found = [base + "." + alias.name if base + "." + alias.name in modules else base for alias in node.names]
    return [name for name in found if name in modules]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {module: set() for module in modules}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(m for m in _imported(module, path, node, modules) if m != module)
    return graph


def _cycle_from(graph, start):
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for following in graph[node]:
            if following == start:
                return path + [start]
            if following not in seen:
                seen.add(following)
                stack.append((following, path + [following]))
    return None


def test_no_import_cycles_even_through_function_local_imports():
    graph = import_graph()
    assert "blipdiff_jax.pipelines.editing" in graph and graph["blipdiff_jax.pipelines.pipeline_blip_diffusion"]
    cycles = [cycle for module in sorted(graph) if (cycle := _cycle_from(graph, module))]
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles[:5])
