"""The package's layout is its data flow: stages on floors, and no import pointing back up.

A newcomer reads the package bottom up: the names every stage shares, then recording (series, the C request
recorder), spans, export (metric readers, the Prometheus endpoint, OTLP), the request path that feeds them
(``@instrument_step``, the HTTP request path), the configuration, the set-up on top (``configure()``), the
instrumentors, and the commands. This test keeps it so: every import of every module of the package, at module
level or inside a function, is of its own floor or of one below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kserve_otel"

#: Bottom first. A module belongs to the floor of the longest prefix of its dotted name listed here.
FLOORS: list[tuple[str, ...]] = [
    ("kserve_otel._version", "kserve_otel.names"),
    ("kserve_otel.recording",),
    ("kserve_otel.spans",),
    ("kserve_otel.export", "kserve_otel.otlp_export"),
    ("kserve_otel.request_path",),
    ("kserve_otel.config",),
    ("kserve_otel.telemetry", "kserve_otel._autostart"),
    ("kserve_otel.instrumentation",),
    ("kserve_otel.cli", "kserve_otel.report"),
    ("kserve_otel",),
]

#: The imports that point up on purpose, each inside a function and with its reason.
UPWARD = {
    # A step wrapper unpickled in a Ray Serve replica adopts the replica's telemetry there and then.
    ("kserve_otel.request_path.steps", "kserve_otel.instrumentation.ray_serve.adoption"),
}


def floor_of(module: str) -> int:
    best, floor = -1, -1
    for index, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), index
    assert floor >= 0, f"{module} is on no floor: add it to FLOORS"
    return floor


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package's modules that ``path`` imports (``from .x import y`` counts ``x.y`` when that is a
    module)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from . import tracing` in kserve_otel/spans: the module imported is kserve_otel.spans.tracing
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if _is_module(candidate):
                    found.add(candidate)
    return {name for name in found if name == "kserve_otel" or name.startswith("kserve_otel.")}


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_no_import_points_up(path: Path) -> None:
    module = module_name(path)
    upward = sorted(target for target in imports_of(path)
                    if floor_of(target) > floor_of(module) and (module, target) not in UPWARD
                    and not module.startswith(target + "."))  # a package's own __init__, imported with it
    assert not upward, f"{module} (floor {floor_of(module)}) imports {upward} from above"


def test_every_stage_says_why_it_exists() -> None:
    for path in MODULES:
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{module_name(path)} has no module docstring"


def test_the_stage_packages_hold_no_code() -> None:
    """``import kserve_otel.config.settings`` (the start-up hook, in every Python process) imports nothing
    more."""
    for stage in ("recording", "spans", "export", "request_path", "config"):
        tree = ast.parse((PACKAGE / stage / "__init__.py").read_text())
        assert all(isinstance(node, ast.Expr) for node in tree.body), f"kserve_otel.{stage} runs code"


def test_the_allowed_upward_imports_still_exist() -> None:
    for module, target in UPWARD:
        path = PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
        assert target in imports_of(path), f"{module} no longer imports {target}: drop it from UPWARD"
