"""Imports inside ``kvtier`` go one way (see ``kvtier/__init__.py``); the client stays light.

What counts as an import: every ``import`` statement, also inside functions, and module names
given as strings where a module is loaded by name (the argument of ``import_module`` and the
items of a module-level ``*_MODULES`` registry such as ``kvtier.cli.SUBCOMMAND_MODULES``).
Imports under ``if TYPE_CHECKING:`` count for the layers but are checked for cycles apart.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "services" / "kvtier"

# Lower number = lower layer. A module may import its own layer or any lower-numbered one.
LAYERS: dict[str, int] = {
    "types": 0, "errors": 0,
    "config": 1, "pages": 1, "finite": 1,
    "codecs": 2,
    "store": 3,
    "policy": 4,
    "transport": 5, "admin": 5,
    "daemon": 6,
    "procs": 7, "lab": 7,
    "cli": 8,
}


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the module imported (a package's submodule when ``from pkg import sub``)
    typing_only: bool  # under ``if TYPE_CHECKING:``


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _is_module(name: str) -> bool:
    if name.startswith("kvtier."):
        return name in _modules()
    return False


def _string_imports(tree: ast.Module) -> list[str]:
    """Module names loaded by name: ``import_module("x")`` and ``*_MODULES = ("x", ...)``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                out.append(str(node.args[0].value))
    for stmt in tree.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else \
            [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id.endswith("_MODULES") for t in targets) and \
                isinstance(stmt.value, (ast.Tuple, ast.List)):
            out += [str(e.value) for e in stmt.value.elts if isinstance(e, ast.Constant)]
    return out


@cache
def _imports(path: Path) -> tuple[Import, ...]:
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    pkg_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    typing_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_nodes |= {id(sub) for stmt in node.body for sub in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        typing_only = id(node) in typing_nodes
        if isinstance(node, ast.Import):
            out += [Import(a.name, typing_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg_parts[: len(pkg_parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append(Import(sub if _is_module(sub) else base, typing_only))
    out += [Import(m, False) for m in _string_imports(tree)]
    return tuple(out)


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "kvtier" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def _own_modules() -> list[tuple[str, Path]]:
    return [(name, path) for name, path in sorted(_modules().items()) if name != "kvtier"]


def test_every_top_level_module_has_a_layer() -> None:
    names = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    names.discard("__init__")
    missing = sorted(n for n in names if n not in LAYERS)
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_modules_named_by_string_exist() -> None:
    """A registry entry left behind by a move fails here, not when the command is run."""
    bad = [f"{name} names {mod!r}" for name, path in _own_modules()
           for mod in _string_imports(ast.parse(path.read_text()))
           if mod.split(".")[0] == "kvtier" and not _is_module(mod)]
    assert not bad, "\n".join(bad)


def test_imports_go_one_way() -> None:
    bad = []
    for name, path in _own_modules():
        own = LAYERS[name.split(".")[1]]
        for imp in _imports(path):
            layer = _layer_of(imp.module)
            if layer is not None and layer > own:
                bad.append(f"{name} (layer {own}) imports {imp.module} (layer {layer})")
    assert not bad, "\n".join(bad)


SHARED_WITH_THE_CLIENT = "kvtier_client.shm_layout"  # the segment layout both sides read
DATA_FRAMES = "kvtier_client.data_frame"  # the data channel's frames, the same for both sides


def test_the_server_imports_the_client_package_only_in_the_lab() -> None:
    """The daemon must not depend on what inference workers import; the lab drives daemons
    the way workers do, so it may. One exception: the transport reads the shared-memory
    segment's layout and the data channel's frames from the modules that define them for both
    sides."""
    bad = [f"{name} imports {imp.module}" for name, path in _own_modules()
           for imp in _imports(path)
           if imp.module.split(".")[0] == "kvtier_client" and not name.startswith("kvtier.lab.")
           and not (imp.module in (SHARED_WITH_THE_CLIENT, DATA_FRAMES)
                    and name.startswith("kvtier.transport."))]
    assert not bad, "\n".join(bad)


def test_the_shared_segment_layout_imports_nothing() -> None:
    """Both sides import it, so it may depend on neither (nor on anything heavy)."""
    path = ROOT / "client" / Path(*SHARED_WITH_THE_CLIENT.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text())
    imports = [ast.unparse(n) for n in ast.walk(tree)
               if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports == ["from __future__ import annotations"], imports


def test_the_data_frames_import_only_the_standard_library() -> None:
    """Both sides import them, so they may depend on neither."""
    path = ROOT / "client" / Path(*DATA_FRAMES.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {str(n.module).split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom)}
    assert names <= {"__future__", "socket", "struct", "collections", "dataclasses"}, names


def test_only_the_transports_import_the_generated_protocol_code() -> None:
    bad = [f"{name} imports {imp.module}" for name, path in _own_modules()
           for imp in _imports(path)
           if imp.module.split(".")[0] == "kvtier_proto"
           and not name.startswith("kvtier.transport.")]
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _graph(typing_too: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {name: {imp.module for imp in _imports(path)
                   if imp.module in modules and imp.module != name
                   and (typing_too or not imp.typing_only)}
            for name, path in modules.items()}


def test_no_import_cycles() -> None:
    """Between any files of ``kvtier``, lazy imports inside functions included."""
    cycles = _cycles(_graph(typing_too=False))
    assert not cycles, f"import cycles: {cycles}"


def test_no_import_cycles_through_type_checking_imports() -> None:
    """Reported apart: a cycle that only annotations close still ties two files together."""
    cycles = _cycles(_graph(typing_too=True))
    assert not cycles, f"import cycles through TYPE_CHECKING imports: {cycles}"


def _store_lock_name() -> str:
    """The attribute ``store/engine.py`` keeps the store's lock in."""
    tree = ast.parse((PKG / "store" / "engine.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                "Condition" in ast.unparse(node.value.func):
            (target,) = node.targets
            assert isinstance(target, ast.Attribute)
            return target.attr
    raise AssertionError("store/engine.py holds no threading.Condition")


def test_only_the_engine_names_the_store_lock() -> None:
    """The engine owns the store's state: everyone else calls its transactions."""
    lock = _store_lock_name()
    bad = [name for name, path in _own_modules()
           if name != "kvtier.store.engine"
           and any(isinstance(n, ast.Attribute) and n.attr == lock
                   for n in ast.walk(ast.parse(path.read_text())))]
    assert not bad, f"{bad} name the store's lock ({lock}); call the engine's transactions"


def test_client_import_stays_light() -> None:
    code = (
        "import sys, kvtier_client\n"
        "heavy = [m for m in ('torch', 'fastapi', 'kvtier') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
