"""The one compiled part of the package: the text signals' per-character scan
(``monitor/signals/textscan.c``). Everything else is declared in ``pyproject.toml``.

``optional=True``: where no C compiler is at hand the install still succeeds, and
``monitor.signals.textstats`` computes the same values in Python (slower: see its comments).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "monitor.signals.textscan",
            sources=["monitor/signals/textscan.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
