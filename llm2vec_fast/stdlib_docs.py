"""A real corpus that every machine has: the docstrings of the Python standard library.

Used by ``make demo`` and the CPU benchmarks, so they need no download.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Iterator


def _first_paragraph(doc: str, max_chars: int) -> str:
    paragraph = doc.strip().split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    return text[:max_chars]


def iter_stdlib_docstrings(min_chars: int = 40, max_chars: int = 600) -> Iterator[dict]:
    """Yield ``{"id": "module.qualname", "text": first paragraph}`` for modules, classes and
    functions.

    Walks the standard library's ``.py`` files in sorted order (so the corpus is the same on every
    run), skipping tests, private names, methods, codecs and idle/tkinter demos.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped_parts = {
        "test",
        "tests",
        "idlelib",
        "turtledemo",
        "site-packages",
        "lib2to3",
        "__pycache__",
        "encodings",
    }
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if skipped_parts & set(relative.parts) or any(
            part.startswith("_") for part in relative.parts
        ):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        yield from _docstrings_of(tree, module, min_chars, max_chars)


def _docstrings_of(tree: ast.Module, module: str, min_chars: int, max_chars: int) -> Iterator[dict]:
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, name = stack.pop(0)
        doc = ast.get_docstring(node, clean=True)
        if doc:
            text = _first_paragraph(doc, max_chars)
            if len(text) >= min_chars:
                yield {"id": name, "text": text}
        # modules hold public classes and functions; classes only nested classes (no methods)
        kinds = (
            (ast.ClassDef,)
            if isinstance(node, ast.ClassDef)
            else (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        )
        for child in ast.iter_child_nodes(node):
            if isinstance(child, kinds) and not child.name.startswith("_"):
                stack.append((child, f"{name}.{child.name}"))
