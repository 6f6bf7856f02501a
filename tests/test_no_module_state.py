"""The decode path keeps no module-level mutable state (issue 34): policy is a value passed in, and what a
decoder captured (traces, compiled steps, step counts) belongs to a DecodeRuntime object, never to a module.

Two checks over every module of the decode path: no `global` statement anywhere (a function that rebinds a
module name is module state by another door), and after import every module-level value is immutable
(numbers, strings, tuples and frozensets of them, frozen dataclasses, read-only mappings, loggers, types)."""

from __future__ import annotations
import __future__

import ast
import dataclasses
import enum
import importlib
import logging
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DECODE_PATH = ["lmforge/decoding", "lmforge/generator.py", "lmforge/serve/engine.py", "lmforge/serve/batching.py",
               "lmforge/quant", "lmforge/model"]


def decode_path_files() -> list[Path]:
    out: list[Path] = []
    for entry in DECODE_PATH:
        p = ROOT / entry
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def immutable(v: object, depth: int = 0) -> bool:
    if depth > 4:
        return False
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes, range, torch.dtype, torch.device,
                                   enum.Enum, logging.Logger, type, types.ModuleType, types.FunctionType,
                                   types.BuiltinFunctionType, __future__._Feature)):
        return True
    if callable(v) and not isinstance(v, (dict, list, set)) and hasattr(v, "__wrapped__"):
        return True  # a decorated function (functools.cache on a lazy loader, torch.inference_mode)
    if isinstance(v, (tuple, frozenset)):
        return all(immutable(x, depth + 1) for x in v)
    if isinstance(v, types.MappingProxyType):
        return all(immutable(x, depth + 1) for x in v.values())
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return v.__dataclass_params__.frozen and all(
            immutable(getattr(v, f.name), depth + 1) for f in dataclasses.fields(v))
    if isinstance(v, typing_special_forms()):
        return True
    return False


def typing_special_forms() -> tuple[type, ...]:
    import typing

    return (typing.TypeVar, type(typing.Any), type(typing.Literal[0]))


@pytest.mark.parametrize("path", decode_path_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_global_statement(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = [f"{path.relative_to(ROOT)}:{n.lineno}: global {', '.join(n.names)}"
             for n in ast.walk(tree) if isinstance(n, ast.Global)]
    assert not found, "module state rebound from a function:\n" + "\n".join(found)


@pytest.mark.parametrize("path", decode_path_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_level_values_are_immutable(path: Path):
    mod = importlib.import_module(module_of(path))
    bad = [f"{mod.__name__}.{name}: {type(v).__name__}" for name, v in vars(mod).items()
           if not name.startswith("__") and not immutable(v)]
    assert not bad, "mutable module-level values in the decode path:\n" + "\n".join(bad)


def test_the_check_catches_mutable_state():
    """The checks above must be able to fail: a dict, a list, a plain dataclass instance are refused."""

    @dataclasses.dataclass
    class Policy:
        mode: str = "auto"

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        mode: str = "auto"

    assert not immutable({}) and not immutable([1]) and not immutable(Policy()) and not immutable((1, [2]))
    assert immutable(Frozen()) and immutable((1, "a", frozenset({2}))) and immutable(types.MappingProxyType({}))
