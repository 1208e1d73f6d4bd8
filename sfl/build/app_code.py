"""A user's app: the code its plug-ins name, and what each deployed place must carry of it.

A federation names its task, aggregation rule, selection and quorum by a built-in name or by
an import path ``package.module:attribute``. A path into the user's app (a package or module
in the app's folder, the one holding its ``cdk.json``) is code the framework does not have,
so it travels to every place that imports it, with the distributions it needs:

- the device artifact: the task (a device trains it);
- the averager's image (and its shard function): the task (to build and score models), the
  aggregation rule and the quorum (the averager closes rounds);
- the initiator's zip: the selection, which stays torch-free (the zip carries boto3 and
  Powertools only).

Planning reads the app's sources and never imports them. It refuses, with the reason, what
could not run where it is sent: a module that is not in the app's folder, an attribute the
module does not define, a top-level name that would shadow the framework, the standard
library or a dependency, and a module-level import the place does not provide. Imports
inside functions, under ``if TYPE_CHECKING:`` or in a ``try`` that handles ``ImportError``
are the app's business (scikit-learn in ``load_central_data``, which only simulation calls).

The app pins what its code needs beyond the framework in ``requirements-task.txt``
(``name==version[; marker]``), installed on every device and in the averager's image; a pin
that contradicts the framework's is refused. The initiator installs nothing of the app's.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sfl.build import artifact
from sfl.core import plugins
from sfl.core.config import ConfigError, FederationConfig

#: The app's pins for its task's (and rules') own dependencies, beside its cdk.json.
APP_REQUIREMENTS = "requirements-task.txt"
#: An app that ships more than this to a place is carrying data, not code.
MAX_APP_BYTES = 50 * 1024 * 1024

DEVICE, AVERAGER, INITIATOR = "device", "averager", "initiator"
PLACES = (DEVICE, AVERAGER, INITIATOR)
#: Plug-in kind -> the places that import it.
KIND_PLACES: dict[str, tuple[str, ...]] = {
    "task": (DEVICE, AVERAGER),
    "aggregation": (AVERAGER,),
    "quorum": (AVERAGER,),
    "selection": (INITIATOR,),
}
#: The packages of ours each place carries (the device's are its import contract's).
AVERAGER_PACKAGES = ("sfl.core", "sfl.state", "sfl.learning", "sfl.server")
#: The import contract whose source modules are what the initiator's zip may hold of ours.
INITIATOR_CONTRACT = "torch-free"
#: Requirement files of the two Lambdas, relative to the framework's checkout.
AVERAGER_REQUIREMENTS = Path("lambdas/averager/requirements.txt")
INITIATOR_REQUIREMENTS = Path("lambdas/initiator/requirements.txt")
#: Both Lambda runtimes (zip and base image) come with boto3 and its own dependencies.
_LAMBDA_RUNTIME = ("boto3", "botocore", "s3transfer", "jmespath", "urllib3")
#: Top-level names of ours: an app package of one of these names would replace ours.
FRAMEWORK_NAMES = frozenset({"sfl", "edge_client", "infra", "handler", "lambdas"})

_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9_.+!-]+)"
    r"(?:\s*;\s*(?P<marker>.+))?$"
)


class AppCodeError(ConfigError):
    """The app's code cannot ship where the configuration needs it; the message says why."""


@dataclass(frozen=True)
class Shipment:
    """What one place receives of the app: files by their path in the app, and pins."""

    files: Mapping[str, bytes] = field(default_factory=dict)
    requirements: tuple[str, ...] = ()
    #: The modules the place imports by name (dotted), the app's and the framework's.
    modules: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.files

    def requirements_text(self, title: str) -> str:
        """The pins as a requirements file, under a comment naming where they come from."""
        if not self.requirements:
            return ""
        return f"# {title}\n" + "".join(f"{line}\n" for line in self.requirements)


@dataclass(frozen=True)
class AppCode:
    """Where the app is, and the shipment of each place (empty when nothing is the app's)."""

    root: Path | None
    shipments: Mapping[str, Shipment]
    plugins: Mapping[str, str]  # kind -> the import path that names app code

    def for_place(self, place: str) -> Shipment:
        return self.shipments.get(place, Shipment())


#: A deployment that names none of the app's code (every plug-in built in).
NO_APP = AppCode(root=None, shipments={}, plugins={})


def normalise(name: str) -> str:
    """A distribution's name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def plan(
    federation: FederationConfig,
    *,
    app_root: Path | None,
    source_root: Path = artifact.SOURCE_ROOT,
) -> AppCode:
    """Find the app code the configuration names and what each place must carry of it."""
    root = app_root.resolve() if app_root is not None else None
    named = {
        kind: getattr(federation, kind)
        for kind in KIND_PLACES
        if plugins.IMPORT_PATH.match(getattr(federation, kind))
    }
    places = _Places(source_root)
    pins = _app_pins(root, places) if root is not None else ()
    shipped: dict[str, dict[str, bytes]] = {place: {} for place in PLACES}
    modules: dict[str, list[str]] = {place: [] for place in PLACES}
    app_plugins: dict[str, str] = {}
    app = _AppSources(root) if root is not None else None
    for kind, path in named.items():
        label = f"{config_key(kind)} {path!r}"
        module_name, _, attribute = path.partition(":")
        for place in KIND_PLACES[kind]:
            modules[place].append(module_name)
        if module_name.split(".")[0] == "sfl":  # ours, named by path: check it is there
            for place in KIND_PLACES[kind]:
                if not places.carries(place, module_name):
                    raise AppCodeError(
                        f"{label}: the {place} does not carry {module_name!r} "
                        f"(it carries {', '.join(places.packages(place))})"
                    )
            continue
        if app is None:
            raise AppCodeError(
                f"{label} is an import path, but this deployment has no app folder to ship "
                "it from; create an app with 'sfl new DIR' and name your code there"
            )
        module = app.module(module_name)
        if module is None:
            raise AppCodeError(
                f"{label}: no module {module_name!r} in the app folder {app.root} (looked for "
                f"{'/'.join(module_name.split('.'))}.py and its __init__.py); the stack ships "
                "the app's code from there"
            )
        if not _defines(module, attribute):
            raise AppCodeError(f"{label}: module {module_name!r} defines no {attribute!r}")
        app_plugins[kind] = path
        reachable = app.reachable(module_name)
        for top in dict.fromkeys(name.split(".")[0] for name in reachable):
            _refuse_shadowing(label, top, places)
            for place in KIND_PLACES[kind]:
                shipped[place].update(app.package_files(top))
        for place in KIND_PLACES[kind]:
            for name in reachable:
                for imported in app.imports(name)[1]:
                    places.check(place, imported, label, name, pins)
    for place, files in shipped.items():
        size = sum(len(b) for b in files.values())
        if size > MAX_APP_BYTES:
            raise AppCodeError(
                f"the app ships {size / 2**20:.1f} MiB of files to the {place} (at most "
                f"{MAX_APP_BYTES // 2**20} MiB): keep data out of the app's packages"
            )
    return AppCode(
        root=root,
        plugins=app_plugins,
        shipments={
            place: Shipment(
                files=dict(sorted(files.items())),
                requirements=tuple(p.line for p in pins) if files and place != INITIATOR else (),
                modules=tuple(dict.fromkeys(modules[place])),
            )
            for place, files in shipped.items()
        },
    )


def config_key(kind: str) -> str:
    return f"config key sfl.{kind}"


# --- the places ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pin:
    name: str  # normalised
    version: str
    line: str


class _Places:
    """What each place provides: packages of ours, and distributions by (normalised) name."""

    def __init__(self, source_root: Path) -> None:
        self.source_root = source_root
        self._packages = {
            DEVICE: artifact.device_packages(source_root),
            AVERAGER: AVERAGER_PACKAGES,
            INITIATOR: artifact.contract_source_modules(INITIATOR_CONTRACT, source_root),
        }
        edge = {pin.name: pin.version for pin in artifact.edge_pins(source_root)}
        self.framework_pins = {
            DEVICE: edge,
            AVERAGER: _read_pins(source_root / AVERAGER_REQUIREMENTS),
            INITIATOR: _read_pins(source_root / INITIATOR_REQUIREMENTS),
        }
        self._distributions = {
            place: set(pins) | {normalise(n) for n in _LAMBDA_RUNTIME}
            for place, pins in self.framework_pins.items()
        }

    def packages(self, place: str) -> tuple[str, ...]:
        return tuple(self._packages[place])

    def carries(self, place: str, module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in self._packages[place]) or (
            module == "sfl"
        )

    def dependency_names(self) -> set[str]:
        """Every distribution any place installs, normalised."""
        return set().union(*self._distributions.values())

    def check(
        self, place: str, imported: str, label: str, importer: str, pins: tuple[_Pin, ...]
    ) -> None:
        """Refuse a module-level import the place does not provide."""
        top = imported.split(".")[0]
        if top in sys.stdlib_module_names or top == "__future__":
            return
        if top == "sfl":
            if self.carries(place, imported):
                return
            raise AppCodeError(
                f"{label}: {importer} imports {imported!r}, which the {place} does not carry "
                f"(it carries {', '.join(self.packages(place))})"
            )
        candidates = {normalise(d) for d in _distributions_of(top)}
        if candidates & self._distributions[place]:
            return
        if place != INITIATOR:
            if candidates & {p.name for p in pins}:
                return
            raise AppCodeError(
                f"{label}: {importer} imports {top!r} at module level, which the {place} does "
                f"not have: pin its distribution in the app's {APP_REQUIREMENTS} (or import it "
                "inside the function that needs it, if the place never calls that function)"
            )
        raise AppCodeError(
            f"{label}: {importer} imports {top!r} at module level; the initiator's zip carries "
            "boto3 and Powertools only (no torch, numpy or app requirements), so a selection "
            "must be plain Python over the registry's records"
        )


def _distributions_of(top: str) -> list[str]:
    """The installed distributions that provide import name ``top``, or ``top`` itself."""
    found = _installed_distributions().get(top)
    return list(found) if found else [top]


@functools.cache
def _installed_distributions() -> Mapping[str, list[str]]:
    """Import name -> distributions, read once per synthesis (it scans every installed
    distribution's files)."""
    return importlib.metadata.packages_distributions()


def _read_pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        match = _PIN.match(line)
        if match:
            pins[normalise(match["name"])] = match["version"]
    return pins


def _app_pins(root: Path, places: _Places) -> tuple[_Pin, ...]:
    """The app's ``requirements-task.txt``: exact pins only, none contradicting ours."""
    path = root / APP_REQUIREMENTS
    if not path.is_file():
        return ()
    pins = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _PIN.match(line)
        if match is None:
            raise AppCodeError(
                f"{path.name}:{number}: {line!r} is not allowed; allowed: 'name==version' "
                "with an optional '; marker' (devices and the averager install exactly this)"
            )
        pin = _Pin(normalise(match["name"]), match["version"], line)
        for place, ours in places.framework_pins.items():
            if place != INITIATOR and pin.name in ours and ours[pin.name] != pin.version:
                raise AppCodeError(
                    f"{path.name}:{number}: {pin.name}=={pin.version} contradicts the "
                    f"framework's {pin.name}=={ours[pin.name]} on the {place}; leave "
                    f"{pin.name} to the framework"
                )
        pins.append(pin)
    return tuple(pins)


def _refuse_shadowing(label: str, top: str, places: _Places) -> None:
    if top in FRAMEWORK_NAMES:
        raise AppCodeError(f"{label}: an app package named {top!r} would replace the framework's")
    if top in sys.stdlib_module_names:
        raise AppCodeError(f"{label}: {top!r} is a standard-library module; rename the package")
    provided = {normalise(d) for d in _distributions_of(top)}
    if provided & places.dependency_names():
        raise AppCodeError(
            f"{label}: {top!r} is the name of a dependency the framework installs; rename "
            "the package"
        )


# --- the app's sources -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module


class _AppSources:
    """The app folder's Python modules, read as source (never imported)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, _Module | None] = {}

    def module(self, name: str) -> _Module | None:
        if name not in self._cache:
            self._cache[name] = self._find(name)
        return self._cache[name]

    def _find(self, name: str) -> _Module | None:
        parts = name.split(".")
        base = self.root.joinpath(*parts)
        for path, is_package in ((base / "__init__.py", True), (base.with_suffix(".py"), False)):
            if path.is_file() and path.resolve().is_relative_to(self.root):
                try:
                    tree = ast.parse(path.read_bytes(), filename=str(path))
                except SyntaxError as e:
                    raise AppCodeError(f"{path}: {e.msg} (line {e.lineno})") from e
                return _Module(name, path, is_package, tree)
        return None

    def reachable(self, start: str) -> list[str]:
        """The app's modules that importing ``start`` imports (module-level), ``start`` first."""
        seen: list[str] = []
        queue = [start]
        while queue:
            name = queue.pop(0)
            if name in seen or self.module(name) is None:
                continue
            seen.append(name)
            parent = name.rpartition(".")[0]
            while parent:  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
                queue.append(parent)
                parent = parent.rpartition(".")[0]
            queue.extend(self.imports(name)[0])
        return seen

    def imports(self, name: str) -> tuple[list[str], list[str]]:
        """What importing this module imports at once: (the app's modules, every other
        module), by absolute name."""
        module = self.module(name)
        assert module is not None
        ours: list[str] = []
        others: list[str] = []
        for node in _import_time_statements(module.tree):
            if isinstance(node, ast.Import):
                bases, submodules = [alias.name for alias in node.names], []
            else:
                base = _absolute(module, node)
                bases, submodules = [base], [f"{base}.{alias.name}" for alias in node.names]
            for target in bases:
                (ours if self.module(target) is not None else others).append(target)
            ours.extend(s for s in submodules if self.module(s) is not None)
        return ours, others

    def package_files(self, top: str) -> dict[str, bytes]:
        """Every file of a top-level package (or the one module), by its path in the app."""
        folder = self.root / top
        if (folder / "__init__.py").is_file():
            files = sorted(
                p
                for p in folder.rglob("*")
                if p.is_file()
                and "__pycache__" not in p.parts
                and p.suffix not in {".pyc", ".pyo"}
                and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
            )
        else:
            files = [self.root / f"{top}.py"]
        return {p.relative_to(self.root).as_posix(): p.read_bytes() for p in files}


def _absolute(module: _Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        raise AppCodeError(f"{module.path}: a relative import reaches above the app's package")
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def _import_time_statements(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in functions, not under
    ``if TYPE_CHECKING:``, not in a ``try`` that handles ImportError."""

    def walk(statements: Iterable[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
        for node in statements:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    yield from walk(node.body)
                yield from walk(node.orelse)
            elif isinstance(node, ast.Try):
                if not any(_handles_import_error(h) for h in node.handlers):
                    yield from walk(node.body)
                for handler in node.handlers:
                    yield from walk(handler.body)
                yield from walk(node.orelse)
                yield from walk(node.finalbody)
            elif isinstance(node, ast.ClassDef | ast.With):
                yield from walk(node.body)

    yield from walk(tree.body)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _handles_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        isinstance(n, ast.Name) and n.id in {"ImportError", "ModuleNotFoundError", "Exception"}
        for n in names
    )


def _defines(module: _Module, attribute: str) -> bool:
    """Whether the module binds ``attribute`` at top level (or may, through ``__getattr__``
    or a star import, which are not followed)."""
    for node in module.tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name in {attribute, "__getattr__"}:
                return True
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == attribute for t in targets):
                return True
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*" or (alias.asname or alias.name.split(".")[0]) == attribute:
                    return True
    return False
