"""The package's folders are its layers (ARCHITECTURE.md): a module never imports one of a higher layer, and no
imports form a cycle, lazily or not: read from their source with ast, so a function-level import counts as much
as a module-level one. Only the command line imports click, and `mixnet --help` imports no heavy library."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mixnet_cli"


def _graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                # A parent package is already imported when its submodule runs: not an edge.
                if candidate in modules and candidate != name and not name.startswith(candidate + "."):
                    graph[name].add(candidate)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for following in sorted(graph[node]):
            if state.get(following) == 1:
                return path[path.index(following):] + [following]
            if following not in state and (found := visit(following)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


# Lowest first. A module may import its own layer and those below it, never one above.
LAYERS = ("base", "images", "network", "weights", "engines", "api", "service", "cli")


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    if module == "mixnet_cli.__main__" or module.startswith("mixnet_cli.cli"):
        return "cli"
    return "api"  # the package itself and its top-level modules: Classifier, eval, export, doctor, ...


def test_every_module_has_a_layer_folder_or_is_the_api() -> None:
    graph = _graph()
    top_level = sorted(name for name in graph if _layer(name) == "api")
    # The API's modules, and the package of the Ray and Spark routes (mixnet_cli.distributed), which belongs to it.
    assert top_level == ["mixnet_cli", "mixnet_cli.classifier", "mixnet_cli.distributed",
                         *(f"mixnet_cli.distributed.{name}" for name in ("cluster", "directory", "extra", "job",
                                                                          "listing", "lock", "predictor", "rows",
                                                                          "spark")),
                         "mixnet_cli.doctor", "mixnet_cli.evaluate", "mixnet_cli.export", "mixnet_cli.output",
                         "mixnet_cli.results"]
    for folder in (*LAYERS, "distributed"):
        if folder not in ("api", "cli"):
            init = PACKAGE / folder / "__init__.py"
            docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
            assert docstring and "import" in docstring, f"{init}: say what the package owns and what it may import"


def test_no_module_imports_a_higher_layer() -> None:
    upward = sorted(
        f"{name} ({_layer(name)}) -> {target} ({_layer(target)})"
        for name, targets in _graph().items() for target in targets
        if LAYERS.index(_layer(target)) > LAYERS.index(_layer(name))
    )
    assert upward == []


def test_the_layer_check_sees_an_upward_import() -> None:
    assert LAYERS.index(_layer("mixnet_cli.base.cache")) < LAYERS.index(_layer("mixnet_cli.weights.download"))
    assert _layer("mixnet_cli.cli.classify") == "cli"
    assert _layer("mixnet_cli.service.serve") == "service" and _layer("mixnet_cli.classifier") == "api"


def test_help_imports_no_heavy_library() -> None:
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from mixnet_cli.cli import main; "
            "result = CliRunner().invoke(main, ['--help']); assert result.exit_code == 0, result.output; "
            "heavy = ('paddle', 'paddleclas', 'onnxruntime', 'openvino', 'torch', 'ray', 'onnx', 'cv2', 'numpy'); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 20 and "mixnet_cli.engines.openvino" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_only_the_cli_imports_click() -> None:
    importers = {path.relative_to(PACKAGE).parts[0] for path in PACKAGE.rglob("*.py")
                 if "import click" in path.read_text(encoding="utf-8")}
    assert importers == {"cli"}
