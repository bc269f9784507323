"""Write the demo corpus: English prose from the Python standard library's own documentation.

Run as `python -m loram_core._stdlib_corpus OUT.txt` in a subprocess, so that importing a couple
of hundred stdlib modules leaves no trace in the process that trains models. Documents are
separated by blank lines (`datasets`' text builder reads them with `sample_by="paragraph"`).
The order is sorted, so the same Python version always writes the same bytes.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import pkgutil
import sys
import warnings

# Modules with side effects on import (windows, browsers, prints) or nothing worth reading.
_SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
    "venv", "pydoc_data", "xxsubtype", "xxlimited", "encodings", "test", "msilib",
}  # fmt: skip


def _modules() -> list[str]:
    names = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP:
            continue
        names.append(name)
        with contextlib.suppress(Exception):
            pkg = importlib.import_module(name)
            if hasattr(pkg, "__path__"):
                names += [
                    m.name for m in pkgutil.walk_packages(pkg.__path__, name + ".") if "._" not in m.name
                ]
    return sorted(set(names))


def _docs_of(obj: object, owner: str, seen: set[str], depth: int = 0) -> list[str]:
    out = []
    doc = inspect.getdoc(obj)
    if doc and len(doc) > 40 and doc not in seen:
        seen.add(doc)
        out.append(doc)
    if depth < 2 and (inspect.ismodule(obj) or inspect.isclass(obj)):
        for key, value in sorted(vars(obj).items()):
            is_code = inspect.isclass(value) or inspect.isroutine(value)
            if key.startswith("_") or not is_code or getattr(value, "__module__", owner) != owner:
                continue
            out += _docs_of(value, owner, seen, depth + 1)
    return out


def build_documents() -> list[str]:
    """Docstrings of the standard library, then the language reference's help topics."""
    warnings.simplefilter("ignore")
    seen: set[str] = set()
    docs: list[str] = []
    for name in _modules():
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - platform-specific modules fail in many ways
            continue
        docs += _docs_of(module, name, seen)
    from pydoc_data.topics import topics

    docs += [topics[key] for key in sorted(topics)]
    # One document per paragraph block: collapse inner blank lines so documents stay whole.
    return ["\n".join(line for line in d.splitlines() if line.strip()) for d in docs]


if __name__ == "__main__":
    with open(sys.argv[1], "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(build_documents()) + "\n")
