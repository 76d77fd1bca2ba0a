"""Every public definition in funnelqa/ has a docstring.

Public: a module-level function or class whose name does not start with '_', and a method (or
property) of such a class whose name does not start with '_'. Functions nested in others (the typer
commands that ``register()`` defines) are not module-level, so they are not counted; their
docstrings are the commands' --help anyway.

One exemption: a method that overrides a method with a docstring on one of the PROTOCOLS below
may go without its own, because help() and inspect.getdoc() show the protocol's. Write one
anyway when the override does something the protocol's docstring does not say.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "funnelqa"
# Base classes whose documented methods are the contract their subclasses implement.
PROTOCOLS = {"Backend", "HTTPBackend", "Questioner"}


def _public(name: str) -> bool:
    return not name.startswith("_")


def _classes(trees: dict[Path, ast.Module]) -> dict[str, ast.ClassDef]:
    return {node.name: node for tree in trees.values() for node in tree.body if isinstance(node, ast.ClassDef)}


def _protocol_docs(classes: dict[str, ast.ClassDef]) -> dict[str, set[str]]:
    """Per protocol, the names of its methods that have a docstring."""
    return {
        name: {
            item.name for item in classes[name].body
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(item)
        }
        for name in PROTOCOLS
    }


def _ancestors(cls: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> set[str]:
    """Names of the funnelqa classes that ``cls`` derives from, directly or not."""
    found: set[str] = set()
    pending = [base.id for base in cls.bases if isinstance(base, ast.Name)]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        if name in classes:
            pending += [base.id for base in classes[name].bases if isinstance(base, ast.Name)]
    return found


def undocumented() -> list[str]:
    """'funnelqa/PATH:LINE NAME' of every public definition without a docstring."""
    trees = {path: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))}
    classes = _classes(trees)
    protocol_docs = _protocol_docs(classes)
    missing = []
    for path, tree in trees.items():
        where = path.relative_to(PACKAGE.parent)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or not _public(node.name):
                continue
            if not (ast.get_docstring(node) or "").strip():
                missing.append(f"{where}:{node.lineno} {node.name}")
            if not isinstance(node, ast.ClassDef):
                continue
            inherited = set().union(*(protocol_docs[p] for p in _ancestors(node, classes) & PROTOCOLS))
            for item in node.body:
                if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) or not _public(item.name):
                    continue
                if not (ast.get_docstring(item) or "").strip() and item.name not in inherited:
                    missing.append(f"{where}:{item.lineno} {node.name}.{item.name}")
    return missing


def test_every_public_definition_has_a_docstring():
    missing = undocumented()
    assert not missing, f"{len(missing)} public definitions have no docstring:\n" + "\n".join(missing)


def test_the_check_sees_what_it_should():
    trees = {path: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))}
    classes = _classes(trees)
    assert PROTOCOLS <= set(classes)
    assert {"generate", "from_spec", "close"} <= _protocol_docs(classes)["Backend"]
    assert {"Backend", "HTTPBackend"} <= _ancestors(classes["GeminiBackend"], classes)
