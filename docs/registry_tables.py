"""Write the tables of registered names into docs/architecture.md, from the registries themselves.

Run ``python docs/registry_tables.py`` after adding or renaming a built-in part;
``python docs/registry_tables.py --check`` exits 1 when the page is out of date
(``tests/test_docs_examples.py`` checks the same). Each table sits between
``<!-- registry: KIND -->`` and ``<!-- /registry -->`` lines; only the text
between them is replaced.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

PAGE = Path(__file__).resolve().parent / "architecture.md"

#: (module, attribute) of every registry, in the order the page lists them. A module that
#: registers into another module's registry (quant.gptq into quant.rtn's SCHEMES, the merge
#: modules into merge.core's MERGE_METHODS) is imported through its package.
REGISTRIES = [
    ("sparseforge.scores", "SCORES"),
    ("sparseforge.patterns", "PATTERNS"),
    ("sparseforge.allocation", "ALLOCATIONS"),
    ("sparseforge.schedules", "SCHEDULES"),
    ("sparseforge.updates", "UPDATES"),
    ("sparseforge.method", "METHODS"),
    ("sparseforge.merge.core", "MERGE_METHODS"),
    ("sparseforge.peft.config", "ADAPTERS"),
    ("sparseforge.quant.rtn", "SCHEMES"),
    ("sparseforge.architectures", "ARCHITECTURES"),
    ("sparseforge.formats", "FORMATS"),
    ("sparseforge.compact.layouts", "LAYOUTS"),
    ("sparseforge.datasets", "DATASETS"),
]

_SECTION = re.compile(r"(<!-- registry: (?P<kind>[^>]+?) -->\n)(?P<body>.*?)(<!-- /registry -->)", re.S)


def _describe(name: str, obj: Any) -> str:
    from sparseforge.registry import summary

    spelling = getattr(obj, "spelling", "")  # patterns: how the family is written
    text = summary(obj)
    return f"written `{spelling}`: {text}" if isinstance(spelling, str) and spelling and spelling != name else text


def tables() -> dict[str, str]:
    """Registry kind -> its section: where it lives and the Markdown table of its names."""
    import sparseforge  # noqa: F401 - imports every package, so every built-in is registered
    import sparseforge.quant  # noqa: F401 - not imported by sparseforge itself

    out = {}
    for module, attr in REGISTRIES:
        registry = getattr(importlib.import_module(module), attr)
        path = "src/" + module.replace(".", "/") + ".py"
        out[registry.kind] = f"`{attr}` in `{path}`:\n\n{registry.table(_describe)}"
    return out


def render(text: str) -> str:
    """``text`` with every registry section replaced by the current table; a kind with no registry is an error."""
    current = tables()

    def replace(m: re.Match[str]) -> str:
        kind = m.group("kind").strip()
        if kind not in current:
            raise SystemExit(f"{PAGE.name}: no registry of kind {kind!r} (known: {', '.join(current)})")
        return m.group(1) + current[kind] + m.group(4)

    return _SECTION.sub(replace, text)


def main(argv: list[str]) -> int:
    text = PAGE.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in argv:
        if new != text:
            print(f"{PAGE} is out of date: run python docs/registry_tables.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        PAGE.write_text(new, encoding="utf-8")
        print(f"updated {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
