"""Imports go one way (issue 10): model <- checkpoints <- generate/train <- tasks <- api/serve/cli.

Two checks: a static one that parses every lmforge module (imports inside functions included, since a lazy
import is still an upward dependency) and a dynamic one that imports each layer in a fresh interpreter and
looks at sys.modules, which also catches what the parser cannot see (importlib, a re-export chain).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "lmforge"

# Lowest first. A module may import its own layer and any below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("model", "quant", "cpu_kernels", "tokenizer", "gguf_file", "io", "errors", "config", "families", "device"),
    ("checkpoints",),
    ("decoding", "generator", "train", "data", "metrics", "flops"),
    ("tasks",),
    ("api", "serve", "cli"),
]
LEVEL = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def component(module: str) -> str | None:
    """lmforge.model.lora -> 'model'; the root package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lmforge" else None


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".")
                pkg = pkg if is_pkg else pkg[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from lmforge import quant` imports the submodule lmforge.quant
            subs = [n for n in names if f"{base}.{n}" in MODULES]
            out += [(node.lineno, f"{base}.{n}", []) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                out.append((node.lineno, base, rest))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value, []))
    return out


MODULES = all_modules()


def violations() -> tuple[list[str], list[str]]:
    """(upward imports, imports of private names), each as 'file:line: what'."""
    upward, private = [], []
    for module, path in MODULES.items():
        here = component(module)
        rel = path.relative_to(ROOT)
        for line, target, names in imports_of(path, module):
            if not target.startswith("lmforge"):
                continue
            there = component(target)
            if here is not None and there is not None and there != here and LEVEL[there] > LEVEL[here]:
                upward.append(f"{rel}:{line}: {module} (layer {LEVEL[here]}) imports {target} (layer {LEVEL[there]})")
            if target != module:
                for n in names:
                    if n.startswith("_") and not (n.startswith("__") and n.endswith("__")):
                        private.append(f"{rel}:{line}: {module} imports private name {n!r} from {target}")
    return upward, private


def test_every_module_has_a_layer():
    unknown = sorted({c for m in MODULES if (c := component(m)) is not None and c not in LEVEL})
    assert not unknown, f"lmforge modules with no layer in tests/test_layers.py LAYERS: {unknown}"


def test_no_upward_import():
    upward, _ = violations()
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)


def test_no_private_name_imported_from_another_module():
    _, private = violations()
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_components_import_no_cycle():
    """Within a layer too: two components that import each other (as api and quant once did) are one tangle."""
    edges: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        here = component(module)
        for _line, target, _names in imports_of(path, module):
            there = component(target) if target.startswith("lmforge") else None
            if here and there and there != here:
                edges.setdefault(here, set()).add(there)
    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, set()))
    assert not cycles, f"components that import each other: {cycles}"


def module_cycles() -> list[list[str]]:
    """Every import circle between lmforge modules (imports inside functions included: a lazy import that closes
    a circle still ties the two modules into one), as the strongly connected components of the import graph."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for _line, target, _names in imports_of(path, module):
            if target in MODULES and target != module:
                graph[module].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_import_cycle():
    """Inside one component too (serve/app.py <-> serve/middleware.py once): 0 circles anywhere in lmforge/."""
    cycles = module_cycles()
    assert not cycles, "modules that import each other (directly or around a circle):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_benchmarks_import_no_private_lmforge_name():
    """Benchmarks use lmforge's public API, as a user would: no `_name` imported from an lmforge module."""
    bad = []
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        for line, target, names in imports_of(path, "benchmarks." + path.stem):
            if not target.startswith("lmforge"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
            bad += [f"{path.relative_to(ROOT)}:{line}: {target} {n!r}" for n in private]
    assert not bad, "benchmarks importing lmforge's private names:\n" + "\n".join(bad)


def test_checker_sees_lazy_upward_and_private_imports(tmp_path):
    """The parser must see imports inside functions and relative ones, or the checks above prove nothing."""
    src = ("def f():\n    from lmforge.tasks.classify import train\n"
           "    from ..generate import _Stepper\n    import lmforge.serve.app\n")
    f = tmp_path / "lora.py"
    f.write_text(src)
    found = imports_of(f, "lmforge.model.lora")
    assert (2, "lmforge.tasks.classify", ["train"]) in found
    assert (3, "lmforge.generate", ["_Stepper"]) in found  # a module that no longer exists: parsed all the same
    assert (4, "lmforge.serve.app", []) in found


@pytest.mark.parametrize("level", range(len(LAYERS)), ids=["+".join(p) for p in LAYERS])
def test_importing_a_layer_loads_nothing_above_it(level):
    """Import every module of the layer in a fresh interpreter; no module of a higher layer may be loaded."""
    mods = sorted(m for m in MODULES if component(m) in LAYERS[level] and not m.endswith("__main__"))
    higher = sorted(p for parts in LAYERS[level + 1:] for p in parts)
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}:\n    importlib.import_module(m)\n"
        f"higher = {higher!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'lmforge' and len(m.split('.')) > 1"
        " and m.split('.')[1] in higher)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"importing layer {LAYERS[level]} failed:\n{r.stderr[-3000:]}"
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert not loaded, f"importing {LAYERS[level]} loaded higher-layer modules: {loaded}"


def test_front_door_names_resolve_to_their_home_modules():
    """`import lmforge` stays light (no torch); each public name loads only the layer it lives in."""
    code = (
        "import sys, lmforge\n"
        "assert 'torch' not in sys.modules, 'import lmforge loaded torch'\n"
        "import lmforge.api as api, lmforge.checkpoints as ck, lmforge.generator as g, lmforge.model.heads as h\n"
        "from lmforge.tasks.classifier import Classifier\n"
        "assert lmforge.load is api.load is ck.load and lmforge.load_full is ck.load_full\n"
        "assert lmforge.Generator is api.Generator is g.Generator\n"
        "assert lmforge.embed_texts is api.embed_texts is h.embed_texts\n"
        "assert lmforge.Classifier is api.Classifier is Classifier\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
