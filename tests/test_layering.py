"""Imports inside ``kvtier`` go one way (see ``kvtier/__init__.py``); the client stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "services" / "kvtier"

# Lower number = lower layer. A module may import its own layer or any lower-numbered one.
LAYERS: dict[str, int] = {
    "types": 0, "errors": 0, "config": 0, "pages": 0, "finite": 0,
    "codecs": 1,
    "store": 2,
    "policy": 3,
    "transport": 4, "admin": 4,
    "daemon": 5, "lab": 5, "cli": 5, "procs": 5,
}


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "kvtier" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PKG.parent).with_suffix("")
    pkg_parts = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                out.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                out.append(node.module)
    return out


def test_every_top_level_module_has_a_layer() -> None:
    names = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    names.discard("__init__")
    missing = sorted(n for n in names if n not in LAYERS)
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_imports_go_one_way() -> None:
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "__init__.py":
            continue
        own = LAYERS[rel.parts[0].removesuffix(".py")]
        for mod in _imports(path):
            layer = _layer_of(mod)
            if layer is not None and layer > own:
                bad.append(f"{rel} (layer {own}) imports {mod} (layer {layer})")
    assert not bad, "\n".join(bad)


def test_client_import_stays_light() -> None:
    code = (
        "import sys, kvtier_client\n"
        "heavy = [m for m in ('torch', 'fastapi', 'kvtier') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
