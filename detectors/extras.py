"""Which detectors need an optional extra of the distribution, and the error when it is missing.

alibi-detect is licensed under the BSL 1.1 from 0.12 on, so it is not part of the default install:
its detectors (``cvm``, ``fet``, ``mmd``, ``lsdd``) need ``pip install 'oversight-monitor[alibi]'``.
Asking for one without it is a configuration mistake, reported as one sentence that names the
extra (:class:`MissingExtraError`), at configuration time (:func:`missing_extra`, checked by
``monitor.config``) and again when a detector is built, never as an import traceback.

Standard library only: the check looks for the package (``importlib.util.find_spec``) without
importing it.
"""

from __future__ import annotations

import importlib.util

#: detector module -> (extra of oversight-monitor, the import name it installs, what it is)
_MODULE_EXTRAS: dict[str, tuple[str, str, str]] = {
    "detectors.alibi_detectors": ("alibi", "alibi_detect", "alibi-detect (BSL 1.1, see the README's licences)"),
}


class MissingExtraError(ImportError):
    """A detector's optional dependency is not installed; the message names the extra to install."""


def installed(import_name: str) -> bool:
    """Whether ``import_name`` can be imported (looked up, not imported)."""
    try:
        return importlib.util.find_spec(import_name) is not None
    except (ImportError, ValueError):  # a parent that is not a package, a module without a spec
        return False


def extra_message(what: str, extra: str, label: str) -> str:
    """The one sentence for ``what`` needing ``label`` from the extra ``extra``."""
    return f"{what} needs {label}, which the default install leaves out: pip install 'oversight-monitor[{extra}]'"


def module_extra(module: str) -> str | None:
    """The extra of oversight-monitor that ``module``'s detectors need, or None (the default install)."""
    spec = _MODULE_EXTRAS.get(module)
    return None if spec is None else spec[0]


def missing_for_module(module: str, what: str) -> str | None:
    """Why the detectors of ``module`` cannot be built here (the extra to install), or None."""
    spec = _MODULE_EXTRAS.get(module)
    if spec is None:
        return None
    extra, import_name, label = spec
    return None if installed(import_name) else extra_message(what, extra, label)


def require_module(module: str, what: str) -> None:
    """Raise :class:`MissingExtraError` if ``module``'s extra is not installed."""
    message = missing_for_module(module, what)
    if message is not None:
        raise MissingExtraError(message)
