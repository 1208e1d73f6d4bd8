"""Packaging the initiator's zip on this machine: no Docker, no network, no torch.

The zip holds the handler, the modules of the core package it imports (found by following
its imports, inside functions too), and the pure-Python distributions its
``requirements.txt`` pins, copied from the environment that runs ``cdk synth`` after
checking each installed version against its pin. boto3 comes with the Lambda runtime.
That it carries no torch is the import contract "The initiator's zip and the torch-free core
carry no torch" (``pyproject.toml``, ``lint-imports``), not a list here; bundling fails if
the handler imports a module of the core package that does not exist.
"""

from __future__ import annotations

import importlib.metadata
import modulefinder
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsii
from aws_cdk import ILocalBundling

from sfl.build.app_code import Shipment

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)\s*(?:#.*)?$")


# Files an installer writes into a distribution's .dist-info for its own records (PEP 376's
# INSTALLER and RECORD, PEP 376's REQUESTED, PEP 610's direct_url.json): they differ between
# machines and installers (pip or uv, asked for or pulled in), not between versions.
INSTALLER_FILES = frozenset({"INSTALLER", "RECORD", "REQUESTED", "direct_url.json"})


# Distributions whose compiled modules only speed up a pure-Python implementation they ship as
# well, falling back to it when the compiled one does not import (wrapt/__wrapt__.py). The
# compiled files here are this machine's (its Python, its architecture), not Lambda's: the
# zip carries the Python alone.
OPTIONAL_ACCELERATORS = frozenset({"wrapt"})


class BundlingError(RuntimeError):
    """The initiator cannot be packaged (a core module missing, a pin not installed)."""


@dataclass(frozen=True)
class Pin:
    name: str
    version: str


def read_pins(requirements: Path) -> list[Pin]:
    """``name==version`` lines of a requirements file; anything looser is an error."""
    pins = []
    for number, raw in enumerate(requirements.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise BundlingError(
                f"{requirements}:{number}: {line!r} is not pinned as 'name==version'"
            )
        pins.append(Pin(match["name"], match["version"]))
    return pins


def core_modules(
    handler: Path,
    *,
    source_root: Path,
    package: str,
    plugins: Sequence[str] = (),
    app_root: Path | None = None,
) -> dict[str, Path]:
    """Module name -> file of every module the handler imports, transitively, from ``package``
    or from the handler's own folder; everything else must come from the runtime or a pin.
    ``plugins``: modules the handler imports by name at run time (the configured selection),
    followed too; an app's own are found under ``app_root`` (and shipped whole by the caller)."""
    search = [str(source_root), str(handler.parent)]
    if app_root is not None:
        search.append(str(app_root))
    finder = modulefinder.ModuleFinder(path=search)
    finder.run_script(str(handler))
    for name in plugins:
        finder.import_hook(name)
    missing, _maybe_attributes = finder.any_missing_maybe()
    unresolved = {
        name: sorted(finder.badmodules.get(name, {}))
        for name in missing
        if name.split(".")[0] == package
    }
    if unresolved:
        detail = "; ".join(
            f"{name} (imported by {', '.join(by) or 'the handler'})"
            for name, by in unresolved.items()
        )
        raise BundlingError(f"{handler} imports {package} modules that do not exist: {detail}")
    root = (source_root / package).resolve()
    own_folder = handler.parent.resolve()
    found = {}
    for name, module in finder.modules.items():
        file = getattr(module, "__file__", None)
        if name == "__main__" or not file:
            continue
        path = Path(file).resolve()
        if path.is_relative_to(root) or path.parent == own_folder:
            found[name] = Path(file)
    return found


def vendor_distribution(pin: Pin, output_dir: Path) -> list[Path]:
    """Copy an installed pure-Python distribution's files, after checking it matches its pin."""
    try:
        dist = importlib.metadata.distribution(pin.name)
    except importlib.metadata.PackageNotFoundError as e:
        raise BundlingError(
            f"{pin.name}=={pin.version} is pinned for the initiator but not installed in "
            f"{sys.prefix}; install the initiator's requirements.txt there"
        ) from e
    if dist.version != pin.version:
        raise BundlingError(
            f"{pin.name} {dist.version} is installed in {sys.prefix} but the initiator pins "
            f"{pin.version}; install the initiator's requirements.txt there"
        )
    copied = []
    for file in dist.files or ():
        parts = Path(file).parts
        if parts[0] == ".." or "__pycache__" in parts or file.suffix == ".pyc":
            continue  # console scripts outside site-packages; bytecode of this interpreter
        if parts[0].endswith(".dist-info") and file.name in INSTALLER_FILES:
            continue  # written by whichever installer ran here: the zip's hash would differ
        if file.suffix in {".so", ".pyd", ".dylib"}:
            if pin.name in OPTIONAL_ACCELERATORS:
                continue
            raise BundlingError(
                f"{pin.name} ships compiled code ({file}); it cannot be copied from this "
                "machine into a Lambda zip"
            )
        source = Path(str(dist.locate_file(file)))
        target = output_dir / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        copied.append(target)
    return copied


def bundle(
    *,
    handler: Path,
    requirements: Path,
    source_root: Path,
    package: str,
    output_dir: Path,
    app: Shipment | None = None,
    app_root: Path | None = None,
) -> list[str]:
    """Write the zip's contents into output_dir; returns the core modules it holds. ``app``:
    the user's app code the initiator imports (its selection), copied beside the handler."""
    app = app or Shipment()
    pins = read_pins(requirements)
    modules = core_modules(
        handler, source_root=source_root, package=package, plugins=app.modules, app_root=app_root
    )
    shutil.copyfile(handler, output_dir / handler.name)
    root = (source_root / package).resolve()
    package_files = {p for p in modules.values() if p.resolve().is_relative_to(root)}
    for path in {p for p in modules.values() if p.resolve().parent == handler.parent.resolve()}:
        shutil.copyfile(path, output_dir / path.name)  # the handler's own helper modules
    for path in _with_package_inits(package_files, source_root / package):
        target = output_dir / path.relative_to(source_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    for name, data in app.files.items():
        target = output_dir / name
        if target.exists():
            raise BundlingError(f"the app's file {name} would replace the initiator's own")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    for pin in pins:
        vendor_distribution(pin, output_dir)
    return sorted(modules)


def _with_package_inits(files: Iterable[Path], package_dir: Path) -> set[Path]:
    """The files plus every ``__init__.py`` between them and the package root."""
    result = set(files)
    for file in list(result):
        parent = file.parent
        while parent.resolve().is_relative_to(package_dir.resolve()):
            init = parent / "__init__.py"
            if init.exists():
                result.add(init)
            if parent.resolve() == package_dir.resolve():
                break
            parent = parent.parent
    return result


@jsii.implements(ILocalBundling)
class InitiatorBundling:
    """CDK local bundling for the initiator's zip (CDK never falls back to Docker)."""

    def __init__(
        self,
        *,
        handler: Path,
        requirements: Path,
        source_root: Path,
        package: str,
        app: Shipment | None = None,
        app_root: Path | None = None,
    ):
        self.handler = handler
        self.requirements = requirements
        self.source_root = source_root
        self.package = package
        self.app = app
        self.app_root = app_root

    def try_bundle(self, output_dir: str, *_options: Any, **_kw_options: Any) -> bool:
        # jsii passes the BundlingOptions struct positionally; local bundling ignores it.
        bundle(
            handler=self.handler,
            requirements=self.requirements,
            source_root=self.source_root,
            package=self.package,
            output_dir=Path(output_dir),
            app=self.app,
            app_root=self.app_root,
        )
        return True
