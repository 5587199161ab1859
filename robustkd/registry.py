"""Named registries: one mechanism for tasks, attacks, methods and models.

In the spirit of timm's ``register_model``/``create_model``: names are the API. Third-party
packages add entries either by calling a ``register`` decorator or by declaring an entry point
in the group ``robustkd.<kind>`` (e.g. ``robustkd.tasks``); the entry point may name a module
(importing it runs its decorators) or an object (registered under the entry point's name).
"""
from __future__ import annotations

import contextlib
import importlib.metadata as importlib_metadata
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


class RegistryError(LookupError):
    """A name that cannot be resolved or registered (the message says how to fix it)."""


class DuplicateNameError(RegistryError):
    """Two sources register the same name; ``name`` and ``registry`` say where (the message names both)."""

    def __init__(self, message: str, name: str, registry: Registry):
        super().__init__(message)
        self.name, self.registry = name, registry


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    description: str
    source: str  # "built-in" or the distribution / entry point that registered it


_loading_source: list[str] = []  # set while an entry point's module is being imported


def _first_doc_line(obj: Any) -> str:
    """The docstring's first paragraph on one line (summaries often wrap over two lines)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""


class Registry:
    """A name -> object table with entry-point discovery and helpful errors."""

    def __init__(self, kind: str, group: str | None = None):
        self.kind = kind
        self.group = group or f"robustkd.{kind}s"
        self._entries: dict[str, Entry] = {}
        self._discovered = False
        self.load_errors: dict[str, str] = {}  # entry point -> error message
        self.conflicts: dict[str, str] = {}  # name -> the duplicate-name error (found during discovery)

    # -- registration -------------------------------------------------------------------
    def register(self, name: str | None = None, *, description: str | None = None,
                 **metadata: Any) -> Callable[[Any], Any]:
        """Decorator: ``@REGISTRY.register("name")``; the docstring's first line describes it."""

        def decorator(obj: Any) -> Any:
            self.add(name or getattr(obj, "__name__", None), obj, description=description)
            for key, value in metadata.items():
                setattr(obj, f"_robustkd_{key}", value)
            return obj

        return decorator

    def add(self, name: str | None, obj: Any, *, description: str | None = None,
            source: str | None = None) -> None:
        if not name:
            raise RegistryError(f"a {self.kind} needs a name to be registered")
        if source is None:
            source = _source_of(obj)
            if source != "built-in" and _loading_source:
                source = _loading_source[-1]
        entry = Entry(name, obj, description or _first_doc_line(obj), source)
        old = self._entries.get(name)
        if old is not None and old.obj is not obj:
            if _same_definition(old.obj, obj):
                return  # the same module imported twice (e.g. by path and as a package)
            raise DuplicateNameError(
                f"two plug-ins register the {self.kind} name {name!r}: {old.source} "
                f"({_qualname(old.obj)}) and {source} ({_qualname(obj)}). Rename one of them, "
                f"or uninstall the package you do not want.", name, self)
        self._entries[name] = entry

    # -- lookup -------------------------------------------------------------------------
    def discover(self, refresh: bool = False) -> None:
        """Load every entry point of this registry's group once; a broken plug-in is reported
        (warning + ``load_errors``) and the others stay usable. ``refresh=True`` looks again, for
        a plug-in installed into an already running process."""
        if self._discovered and not refresh:
            return
        if refresh:
            import importlib

            importlib.invalidate_caches()
        self._discovered = True
        for ep in importlib_metadata.entry_points(group=self.group):
            dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown package"
            label = f"entry point {ep.name!r} = {ep.value!r} in group {self.group!r} ({dist})"
            _loading_source.append(f"{dist} ({self.group}:{ep.name})")
            try:
                obj = ep.load()
                if not _is_module(obj):
                    self.add(ep.name, obj, source=f"{dist} ({self.group}:{ep.name})")
            except Exception as exc:  # noqa: BLE001 - a plug-in may fail in any way
                msg = f"could not load {label}: {type(exc).__name__}: {exc}"
                self.load_errors[ep.name] = msg
                if isinstance(exc, DuplicateNameError):  # the name is ambiguous: refuse it, keep the rest
                    exc.registry.conflicts[exc.name] = str(exc)
                warnings.warn(msg + " -- the other plug-ins stay usable.", RuntimeWarning, stacklevel=2)
                continue
            finally:
                _loading_source.pop()

    def get(self, name: str) -> Any:
        if name not in self._entries or not self._discovered:
            self.discover()
        if name in self.conflicts:
            raise DuplicateNameError(self.conflicts[name], name, self)
        if name not in self._entries:
            hint = ""
            if name in self.load_errors:
                hint = f" It failed to load: {self.load_errors[name]}."
            raise RegistryError(
                f"unknown {self.kind} {name!r}. Known {self.kind}s: {', '.join(self.names()) or '(none)'}."
                f"{hint} Third-party {self.kind}s register through the entry-point group "
                f"{self.group!r} or the register decorator."
            )
        return self._entries[name].obj

    def entry(self, name: str) -> Entry:
        self.get(name)
        return self._entries[name]

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        self.discover()
        return [self._entries[n] for n in sorted(self._entries)]

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    @contextlib.contextmanager
    def temporary(self) -> Iterator[Registry]:
        """Restore the registry afterwards (for tests that register throw-away entries).

        The installed plug-ins are discovered first, so what is restored is the registry as any later use sees
        it: a plug-in module registers its entries when it is imported, once per process, so entries that a first
        discovery inside the block registered could not be found again after it. The entries, the discovered
        flag, the load errors and the name conflicts are all restored."""
        self.discover()
        saved = (dict(self._entries), self._discovered, dict(self.load_errors), dict(self.conflicts))
        try:
            yield self
        finally:
            self._entries, self._discovered = dict(saved[0]), saved[1]
            self.load_errors, self.conflicts = dict(saved[2]), dict(saved[3])


def _is_module(obj: Any) -> bool:
    import types

    return isinstance(obj, types.ModuleType)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _same_definition(a: Any, b: Any) -> bool:
    return _qualname(a) == _qualname(b) and getattr(a, "__qualname__", None) is not None


def _source_of(obj: Any) -> str:
    module = (getattr(obj, "__module__", "") or "").split(".")[0]
    if module in ("robustkd", "robustkd_tasks"):
        return "built-in"
    try:
        dists = importlib_metadata.packages_distributions().get(module)
    except Exception:  # noqa: BLE001
        dists = None
    return dists[0] if dists else (module or "unknown")


TASKS = Registry("task")
ATTACKS = Registry("attack")
METHODS = Registry("method")
MODELS = Registry("model")

register_task = TASKS.register
register_attack = ATTACKS.register
register_method = METHODS.register
register_model = MODELS.register
