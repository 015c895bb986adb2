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

Name collisions, and why the submodules themselves are callable: ``params``, ``trace``,
``similarity``, ``prune``, ``evaluate`` and ``sweep`` are also submodules. Python's import
system binds ``moescope.<sub>`` to the module object whenever ``moescope.<sub>`` (or
anything below it) is first imported, by anyone, in any order: a function bound here
would be replaced by the module the moment the CLI or a user imports the submodule. So
instead of fighting the binding, every such submodule is made callable: this package's
module class intercepts the binding (``__setattr__``, which the import system uses) and
switches the submodule's class to :class:`CallableModule`, whose ``__call__`` runs the API
function. ``moescope.params`` is therefore always the module ``moescope.params``, its
functions stay reachable (``moescope.params.count_params``), and ``moescope.params(...)``
works whichever import came first. Reading a colliding name before the submodule was
imported (``__getattr__``) imports it, so the attribute is the same object either way. The
rule lives in this one file: submodules need no hook, and an API name that later gains a
submodule of the same name (``report``, say) is handled too. Static checkers still see a
module there; ``moescope.api.params`` and friends are the plain functions, for typed code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

TYPE_CHECKING = False  # not typing's: typing and inspect stay out of `import moescope` (issue 9)
if TYPE_CHECKING:
    import inspect
    from typing import Any

__version__ = "0.1.0"

#: API name -> (module, function) it resolves to, imported on first use. The plain
#: library function where its signature suits a notebook; a thin wrapper in
#: :mod:`moescope.api` where it did not (a result without ``.to_dict()``, a tuple, a
#: corpus that had to be a list).
API: dict[str, tuple[str, str]] = {
    "params": ("moescope.params", "count_params"),
    "trace": ("moescope.api", "trace"),
    "load_trace": ("moescope.api", "load_trace"),
    "report": ("moescope.stats", "build_report"),
    "similarity": ("moescope.api", "similarity"),
    "prune": ("moescope.api", "prune"),
    "evaluate": ("moescope.api", "evaluate"),
    "import_routes": ("moescope.importers", "import_routes"),
    "sweep": ("moescope.api", "sweep"),
}

__all__ = ["API", "CallableModule", "__version__", *API]


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


class CallableModule(types.ModuleType):
    """A submodule that shares its name with an API function, and runs it when called."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return api_function(self.__name__.rpartition(".")[2])(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature | None:
        """The API function's signature (for ``help()``, IPython's ``?`` and tab completion)."""
        import inspect

        try:
            return inspect.signature(api_function(self.__name__.rpartition(".")[2]))
        except (AttributeError, TypeError, ValueError):
            return None

    def __repr__(self) -> str:
        name = self.__name__.rpartition(".")[2]
        module, attr = API[name]
        return f"<module {self.__name__!r}, callable as {module}.{attr}>"


def _callable(name: str, value: Any) -> Any:
    """``value`` made callable when it is the plain submodule named like the API function."""
    if name in API and type(value) is types.ModuleType and value.__name__ == f"{__name__}.{name}":
        value.__class__ = CallableModule
    return value


class _Package(types.ModuleType):
    """This package's module class: binds colliding submodules as callable modules."""

    def __setattr__(self, name: str, value: Any) -> None:
        # the import system binds a freshly imported submodule with setattr(parent, name, module)
        super().__setattr__(name, _callable(name, value))

    def __getattr__(self, name: str) -> Any:  # only for names not bound yet
        if name not in API:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")  # bound (callable) on import
        return api_function(name)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *API})


sys.modules[__name__].__class__ = _Package
for _name, _value in list(vars(sys.modules[__name__]).items()):  # submodules bound before the swap
    _callable(_name, _value)
del _name, _value
