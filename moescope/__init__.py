"""moescope: size, routing and redundancy of Mixture-of-Experts language models.

The library is the product; the ``moescope`` command is a thin layer over it.
Modules never print: they return dataclasses (with ``.to_dict()``) or DataFrames.

The notebook API, one call per command (details in :mod:`moescope.api`)::

    import moescope
    moescope.params("demo")                                # ParamsReport
    run = moescope.trace("demo", "demo", "traces/demo")    # TraceRun
    t = moescope.load_trace("traces/demo")                 # Trace: .expert_load, .coactivation, ...
    moescope.report("traces/demo")                         # Report: one DataFrame per table
    moescope.similarity("demo"), moescope.evaluate("demo", "demo")
    moescope.prune("demo", "traces/demo", drop=2, dry_run=True)
    moescope.import_routes(...), moescope.sweep(...)

``import moescope`` stays cheap (no torch, transformers, pandas or matplotlib): every API
name is resolved on first use.

Every API name is a plain function, looked up on first use by the module ``__getattr__``
of PEP 562 (no submodule shares an API name, so nothing the import system binds can
shadow one); ``moescope.api`` holds the thin wrappers, for typed code.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: typing and inspect stay out of `import moescope` (issue 9)
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

#: API name -> (module, function) it resolves to, imported on first use. The plain
#: library function where its signature suits a notebook; a thin wrapper in
#: :mod:`moescope.api` where it did not (a result without ``.to_dict()``, a tuple, a
#: corpus that had to be a list).
API: dict[str, tuple[str, str]] = {
    "params": ("moescope.accounting.params", "count_params"),
    "trace": ("moescope.api", "trace"),
    "load_trace": ("moescope.api", "load_trace"),
    "report": ("moescope.stats.report", "build_report"),
    "similarity": ("moescope.api", "similarity"),
    "prune": ("moescope.api", "prune"),
    "evaluate": ("moescope.api", "evaluate"),
    "import_routes": ("moescope.importers", "import_routes"),
    "sweep": ("moescope.api", "sweep"),
}

__all__ = ["API", "__version__", *API]


def api_function(name: str) -> Any:
    """The function behind the API name ``name`` (imports its module).

    Raises:
        AttributeError: ``name`` is not an API name, or its module is not installed.
    """
    try:
        module, attr = API[name]
    except KeyError:
        raise AttributeError(f"module 'moescope' has no attribute {name!r}") from None
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise AttributeError(
            f"moescope.{name} is unavailable: {module}.{attr} cannot be imported ({exc})"
        ) from exc


def __getattr__(name: str) -> Any:
    """An API function, imported on first use (PEP 562)."""
    if name not in API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # not cached in globals(): a patched target (a test, a notebook) is seen on the next call
    return api_function(name)


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
