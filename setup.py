"""Puts kserve-otel's start-up hook, ``kserve_otel_autostart.pth``, into site-packages, for wheels and for
editable installs alike, and builds the optional C extensions ``kserve_otel.recording._speedups``,
``kserve_otel.export._otlp`` and ``kserve_otel.spans._spans`` (everything else about the package is in
pyproject.toml).

The extensions are optional: where one cannot be compiled (no C compiler, a free-threaded Python), the install
goes on and ``kserve_otel.recording.speedups`` / ``kserve_otel.export.otlp_encoding`` /
``kserve_otel.spans.tracing`` use their pure-Python twins. ``KSERVE_OTEL_NO_EXTENSION=1`` skips all three.

The hook is one line that Python's ``site`` module runs at every interpreter start; it costs a dictionary
lookup and one ``stat`` unless auto-instrumentation may be on (see ``kserve_otel/_autostart.py``).
"""

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "kserve_otel_autostart.pth"
PTH_LINE = (
    'import os; ("KSERVE_OTEL_ENABLED" in os.environ or os.path.exists(os.environ.get('
    '"KSERVE_OTEL_ANNOTATIONS_FILE") or "/etc/podinfo/annotations")) and __import__("kserve_otel._autostart")\n'
)


class BuildPyWithPth(build_py):
    """A wheel's root lands in site-packages: put the .pth file there."""

    def run(self) -> None:
        super().run()
        Path(self.build_lib, PTH_NAME).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH_NAME))]


class EditableWheelWithPth(editable_wheel):
    """An editable wheel links the sources instead of copying them; add the .pth file to it all the same."""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):  # type: ignore[no-untyped-def]
        files, mapping = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        Path(unpacked_wheel, PTH_NAME).write_text(PTH_LINE)
        return files, mapping


EXTENSIONS = [] if os.environ.get("KSERVE_OTEL_NO_EXTENSION") else [
    Extension("kserve_otel.recording._speedups", ["kserve_otel/recording/_speedups.c"], optional=True,
              extra_compile_args=["-O2"]),
    Extension("kserve_otel.export._otlp", ["kserve_otel/export/_otlp.c"], optional=True,
              extra_compile_args=["-O2"]),
    Extension("kserve_otel.spans._spans", ["kserve_otel/spans/_spans.c"], optional=True,
              extra_compile_args=["-O2"]),
]

setup(
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
    ext_modules=EXTENSIONS,
)
