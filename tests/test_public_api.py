"""The README's "Public API" table is each public module's ``__all__``, and every name in it is documented."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _documented() -> dict[str, set[str]]:
    text = README.read_text()
    section = text.split("## Public API", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_.]+)` \| (.+?) \| .+ \|$", section, re.M)
    return {module: set(re.findall(r"`([A-Za-z_]+)`", names)) for module, names in rows}


def test_the_readme_lists_the_public_modules() -> None:
    assert set(_documented()) == {
        "kserve_otel", "kserve_otel.instrumentation.kserve", "kserve_otel.instrumentation.ray_serve",
        "kserve_otel.instrumentation.asgi", "kserve_otel.otlp_export",
    }


def test_each_modules_all_is_what_the_readme_documents() -> None:
    for module_name, names in _documented().items():
        module = importlib.import_module(module_name)
        assert set(module.__all__) == names, module_name
        for name in names - {"__version__"}:
            value = getattr(module, name)
            assert (value.__doc__ or "").strip(), f"{module_name}.{name} has no docstring"
