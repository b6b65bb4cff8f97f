"""The public surface: `eventlog.__all__` is complete, and the errors docstring draws the real tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
import typing
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

import eventlog
import eventlog.errors


def is_public_module(name: str) -> bool:
    """Users import names of a public submodule (eventlog.migrate) from it, not from eventlog."""
    return not any(part.startswith("_") for part in name.split("."))

# Classes that public signatures mention but users never create or import.
NOT_EXPORTED = {
    # `EventLog.listener` exposes the shared listener for tests and diagnostics.
    "Listener",
}


def package_modules() -> Iterator[ModuleType]:
    yield eventlog
    for info in pkgutil.walk_packages(eventlog.__path__, "eventlog."):
        if info.name.startswith(("eventlog._migrations", "eventlog._pgserver", "eventlog.__main__")):
            continue  # Alembic scripts, the test-server helper and `python -m eventlog`
        yield importlib.import_module(info.name)


def test_all_names_exist() -> None:
    assert len(set(eventlog.__all__)) == len(eventlog.__all__)
    missing = [name for name in eventlog.__all__ if not hasattr(eventlog, name)]
    assert missing == []


def test_module_all_names_exist() -> None:
    for module in package_modules():
        names = getattr(module, "__all__", [])
        assert [n for n in names if not hasattr(module, n)] == [], module.__name__


def test_errors_exported() -> None:
    classes = {
        name for name, value in vars(eventlog.errors).items()
        if isinstance(value, type) and issubclass(value, eventlog.EventLogError)
    }

    assert classes | {"is_transient"} == set(eventlog.errors.__all__)
    assert classes - set(eventlog.__all__) == set()


def classes_in(hint: Any) -> Iterator[type]:
    if isinstance(hint, type):
        yield hint
    for arg in typing.get_args(hint):
        yield from classes_in(arg)


def namespace() -> dict[str, Any]:
    # Annotations name classes that modules import only for type checking.
    names: dict[str, Any] = {}
    for module in package_modules():
        names.update({k: v for k, v in vars(module).items() if isinstance(v, type)})
    return names


def public_signature_classes(owner: type, names: dict[str, Any]) -> Iterator[tuple[str, type]]:
    members = [("__init__", owner.__init__)] if "__init__" in vars(owner) else []
    members += [(n, v) for n, v in inspect.getmembers(owner) if not n.startswith("_")]
    for name, member in members:
        if isinstance(member, property):
            member = member.fget
        if not callable(member) or isinstance(member, type):
            continue
        if not getattr(inspect.unwrap(member), "__module__", "").startswith("eventlog"):
            continue  # inherited from pydantic or the standard library
        try:
            module_names = getattr(inspect.unwrap(member), "__globals__", {})
            hints = typing.get_type_hints(member, globalns={**names, **module_names})
        except TypeError:
            continue  # a builtin slot wrapper
        for hint in hints.values():
            for cls in classes_in(hint):
                yield f"{owner.__name__}.{name}", cls
    if issubclass(owner, eventlog.Settings.__mro__[1]):  # pydantic models: their fields
        module_names = vars(sys.modules[owner.__module__])
        for field, hint in typing.get_type_hints(owner, globalns={**names, **module_names}).items():
            for cls in classes_in(hint):
                yield f"{owner.__name__}.{field}", cls


def test_public_signatures_use_exported_classes() -> None:
    names = namespace()
    unexported = set()
    seen = set()
    for exported in eventlog.__all__:
        owner = getattr(eventlog, exported)
        if not isinstance(owner, type):
            continue
        for where, cls in public_signature_classes(owner, names):
            seen.add(cls.__name__)
            module = getattr(cls, "__module__", "")
            if not module.startswith("eventlog") or cls.__name__ in NOT_EXPORTED:
                continue
            if cls.__name__ not in eventlog.__all__ and not is_public_module(module):
                unexported.add(f"{where} uses {module}.{cls.__name__}")
    assert {"Event", "EventFilter", "Subscription", "AsyncSubscription", "SubscriptionState", "Settings"} <= seen
    assert unexported == set()


TREE_LINE = re.compile(r"^(?P<indent>[ │├└─]*?)(?:[├└]── )?(?P<name>[A-Z]\w+)(?: \((?P<extra>[\w, ]+)\))?(?:\s|$)")


def docstring_tree() -> dict[str, tuple[str | None, set[str]]]:
    """Class name -> (parent in the drawing, extra bases in parentheses)."""
    doc = eventlog.errors.__doc__ or ""
    block = doc.split("::", 1)[1].split("\n\n")[1]
    tree: dict[str, tuple[str | None, set[str]]] = {}
    stack: list[tuple[int, str]] = []
    lines = block.splitlines()
    margin = len(lines[0]) - len(lines[0].lstrip())
    for line in lines:
        text = line[margin:].rstrip()
        match = TREE_LINE.match(text)
        assert match, f"unreadable tree line {line!r}"
        depth = (text.index("── ") + 3) // 4 if "── " in text else 0
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parent = stack[-1][1] if stack else None
        extra = {e.strip() for e in (match["extra"] or "").split(",") if e.strip()}
        tree[match["name"]] = (parent, extra)
        stack.append((depth, match["name"]))
    return tree


def error_classes() -> dict[str, type]:
    return {
        name: value for name, value in vars(eventlog.errors).items()
        if isinstance(value, type) and issubclass(value, BaseException)
        and value.__module__ == "eventlog.errors"
    }


def test_errors_docstring_names_every_class() -> None:
    assert set(docstring_tree()) == set(error_classes())


@pytest.mark.parametrize("name", sorted(error_classes()))
def test_errors_docstring_tree_matches(name: str) -> None:
    parent, extra = docstring_tree()[name]
    cls = error_classes()[name]

    ours = [b for b in cls.__bases__ if b.__module__ == "eventlog.errors"]
    others = {b.__name__ for b in cls.__bases__ if b.__module__ != "eventlog.errors"}
    assert [b.__name__ for b in ours] == ([parent] if parent else [])
    assert others - {"Exception"} == extra
