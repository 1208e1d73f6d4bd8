"""The edge client's Greengrass artifact: a deterministic zip of the code a device runs.

It holds the packages a device runs, whole: ``edge_client`` and the ``sfl`` packages it
stands on (``sfl.core``, ``sfl.state``, ``sfl.learning``, with ``sfl/__init__.py``). They are
named once, as the source modules of the import contract ``device`` in ``pyproject.toml``,
which forbids them to import any other package of ours (``lint-imports``): so local mode, the
Lambdas, the CLI, the build and the tests never ship to a device. It also holds
``requirements-edge.txt``, a copy of ``requirements/edge.txt`` checked against
``requirements/runtime.txt`` so a device runs the versions the tests ran. Same sources, same
bytes: entries are sorted, timestamps and permissions fixed and nothing is compressed, so the
SHA-256 changes only when code or pins do. Building it needs a source checkout.

``build_wheel_bundle`` makes the optional second artifact: a zip of wheels from a directory
(``pip download`` output) that lets the Install step work with no index at all.
"""

from __future__ import annotations

import ast
import hashlib
import io
import re
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sfl.build.app_code import Shipment

SOURCE_ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = "pyproject.toml"
RUNTIME_REQUIREMENTS = Path("requirements") / "runtime.txt"
EDGE_REQUIREMENTS = Path("requirements") / "edge.txt"
ARCHIVE_NAME = "sfl-edge-client.zip"
WHEEL_BUNDLE_NAME = "sfl-edge-wheels.zip"
REQUIREMENTS_FILE = "requirements-edge.txt"
# The pins the tests ran apply to these Pythons; other markers are alternatives for others.
_TESTED_MARKERS = ("", 'python_version >= "3.11"')

# The import contract (``[tool.importlinter]`` in pyproject.toml) whose source modules are
# the packages a device runs.
DEVICE_CONTRACT = "device"

# Top-level imports of the client's code -> the distribution (as named in runtime.txt) that
# provides them; None: imported only on paths a device never runs (sklearn: a task's
# load_central_data; dp_accounting: the averager's accountant, which a device with local DP
# uses to log its own epsilon only if it is installed). A new third-party import must be
# added here, or the build fails.
EDGE_DISTRIBUTIONS: dict[str, str | None] = {
    "awsiot": "awsiotsdk",  # round notices through Greengrass IPC (edge_client.notices)
    "boto3": "boto3",
    "botocore": "boto3",
    "dp_accounting": None,  # the averager's privacy accountant (sfl.learning.accountant)
    "numpy": "numpy",
    "PIL": "pillow",  # the image_folder task reads images
    "safetensors": "safetensors",
    "sklearn": None,
    "torch": "torch",
    "torchvision": "torchvision",  # the image_folder task's architectures
}

_FIXED_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can hold
_FILE_MODE = 0o644
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(?P<version>[^\s;]+)$")
_EDGE_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9_.-]+)==(?P<version>[A-Za-z0-9_.+!-]+)(?:\s*;\s*(?P<marker>.+))?$"
)
_WHEEL = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.+!]+)-.+\.whl$")


class ArtifactError(ValueError):
    """The client artifact cannot be built as specified (an unknown import, a missing pin)."""


@dataclass(frozen=True)
class ArtifactInfo:
    """A built artifact: where the zip is and the SHA-256 (hex) of its bytes."""

    path: Path
    sha256: str

    @property
    def archive_name(self) -> str:
        """The file name; Greengrass unpacks the zip into a folder named after its stem."""
        return self.path.name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(path: Path) -> set[str]:
    """Top-level names a module imports at run time (``if TYPE_CHECKING:`` blocks skipped):
    what must be installed on a device for it to import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.body:
                typing_only.update(id(n) for n in ast.walk(statement))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level or node.module is None:
                raise ArtifactError(f"{path}: relative import; the client uses absolute ones")
            modules.add(node.module)
    return {m.partition(".")[0] for m in modules}


def contract_source_modules(contract_id: str, source_root: Path = SOURCE_ROOT) -> tuple[str, ...]:
    """The source modules of one import contract of ``pyproject.toml``, by its ``id``."""
    path = source_root / PYPROJECT
    try:
        with path.open("rb") as f:
            contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise ArtifactError(
            f"{path}: no import contracts ({e}); the framework is used from a checkout"
        ) from e
    for contract in contracts:
        if contract.get("id") == contract_id:
            return tuple(contract["source_modules"])
    raise ArtifactError(f"{path}: no import contract with id {contract_id!r}")


def device_packages(source_root: Path = SOURCE_ROOT) -> tuple[str, ...]:
    """The packages a device runs: the source modules of import contract ``device``."""
    return contract_source_modules(DEVICE_CONTRACT, source_root)


def client_files(source_root: Path = SOURCE_ROOT) -> list[Path]:
    """The client's source files: every module of the device's packages, and the
    ``__init__.py`` of each package above them (``sfl/__init__.py``)."""
    files: set[Path] = set()
    for package in device_packages(source_root):
        folder = source_root.joinpath(*package.split("."))
        if not (folder / "__init__.py").is_file():
            raise ArtifactError(f"{folder}: the device's package {package!r} is not there")
        files.update(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)
        parent = folder.parent
        while parent != source_root:
            files.add(parent / "__init__.py")
            parent = parent.parent
    return sorted(files)


def third_party_imports(source_root: Path = SOURCE_ROOT) -> set[str]:
    """Top-level names the client imports that are neither ours nor the standard library."""
    names: set[str] = set()
    for path in client_files(source_root):
        names |= _top_level_imports(path)
    ours = {package.partition(".")[0] for package in device_packages(source_root)}
    return {n for n in names if n not in sys.stdlib_module_names and n not in ours}


def _runtime_pins(source_root: Path) -> dict[str, str]:
    path = source_root / RUNTIME_REQUIREMENTS
    if not path.is_file():
        raise ArtifactError(
            f"{path} not found: the client artifact is built from a source checkout"
        )
    pins: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        match = _PIN.match(line)
        if match:
            pins[match["name"].lower().replace("_", "-")] = match["version"]
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class EdgePin:
    """One line of ``requirements/edge.txt``: ``name==version`` with an optional marker."""

    name: str
    version: str
    marker: str
    line: str


def edge_pins(source_root: Path = SOURCE_ROOT) -> list[EdgePin]:
    """``requirements/edge.txt``'s pins, each checked against runtime.txt where tests ran it."""
    path = source_root / EDGE_REQUIREMENTS
    if not path.is_file():
        raise ArtifactError(f"{path} not found: the client artifact is built from a checkout")
    runtime = _runtime_pins(source_root)
    pins: list[EdgePin] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _EDGE_PIN.match(line)
        if match is None:
            raise ArtifactError(f"{EDGE_REQUIREMENTS}: {line!r} is not 'name==version[; marker]'")
        pin = EdgePin(
            _normalise(match["name"]), match["version"], (match["marker"] or "").strip(), line
        )
        if pin.marker in _TESTED_MARKERS and runtime.get(pin.name) != pin.version:
            raise ArtifactError(
                f"{EDGE_REQUIREMENTS} pins {pin.name}=={pin.version}, but "
                f"{RUNTIME_REQUIREMENTS} (what the tests run) has {runtime.get(pin.name)}"
            )
        pins.append(pin)
    return pins


def edge_requirements(source_root: Path = SOURCE_ROOT) -> str:
    """``requirements-edge.txt``: ``requirements/edge.txt``, checked to cover the client."""
    imported = third_party_imports(source_root)
    unknown = sorted(imported - set(EDGE_DISTRIBUTIONS))
    if unknown:
        raise ArtifactError(
            f"the edge client imports {', '.join(unknown)}: add the distribution(s) to "
            "sfl.build.artifact.EDGE_DISTRIBUTIONS and pin them in requirements/runtime.txt "
            f"and {EDGE_REQUIREMENTS}"
        )
    pins = edge_pins(source_root)
    tested = {p.name for p in pins if p.marker in _TESTED_MARKERS}
    needed = {EDGE_DISTRIBUTIONS[n] for n in imported} - {None}
    missing = sorted(str(name) for name in needed if name not in tested)
    if missing:
        raise ArtifactError(f"{EDGE_REQUIREMENTS} pins no version of {', '.join(missing)}")
    return (source_root / EDGE_REQUIREMENTS).read_text(encoding="utf-8")


@dataclass(frozen=True)
class BundledWheel:
    name: str
    version: str
    filename: str


def _wheels(wheel_dir: Path) -> list[BundledWheel]:
    found = []
    for path in sorted(wheel_dir.iterdir()):
        match = _WHEEL.match(path.name)
        if match and path.is_file():
            found.append(BundledWheel(_normalise(match["name"]), match["version"], path.name))
    return found


def _same_release(pinned: str, wheel_version: str) -> bool:
    """``==2.14.1`` accepts ``2.14.1`` and local builds such as ``2.14.1+cpu`` (PEP 440)."""
    return wheel_version == pinned or wheel_version.startswith(pinned + "+")


def build_wheel_bundle(
    wheel_dir: Path, path: Path, *, source_root: Path = SOURCE_ROOT
) -> ArtifactInfo:
    """Zip the wheels in ``wheel_dir`` into ``path`` (``.../sfl-edge-wheels.zip``).

    Every distribution ``requirements/edge.txt`` pins must have a wheel of its pinned version
    there (for at least one of a pin's alternatives); their dependencies are pip's business at
    install time (``pip download`` puts them in the same directory). Deterministic like the
    client artifact. Wheels for several platforms may share one bundle: pip picks.
    """
    if path.suffix != ".zip":
        raise ArtifactError(f"{path}: the wheel bundle must be a .zip (the recipe unpacks ZIP)")
    if not wheel_dir.is_dir():
        raise ArtifactError(f"{wheel_dir}: no such directory of wheels")
    wheels = _wheels(wheel_dir)
    missing = []
    for name in sorted({p.name for p in edge_pins(source_root)}):
        alternatives = [p for p in edge_pins(source_root) if p.name == name]
        if not any(
            w.name == name and _same_release(p.version, w.version)
            for p in alternatives
            for w in wheels
        ):
            missing.append(" or ".join(f"{p.name}=={p.version}" for p in alternatives))
    if missing:
        raise ArtifactError(
            f"{wheel_dir} has no wheel for {'; '.join(missing)} (fill it with "
            "'pip download -r requirements/edge.txt ...', see docs/greengrass.md)"
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for wheel in wheels:
            archive.writestr(_entry(wheel.filename), (wheel_dir / wheel.filename).read_bytes())
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return ArtifactInfo(path=path, sha256=hashlib.sha256(data).hexdigest())


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIMESTAMP)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # Unix, so external_attr holds the file mode
    info.external_attr = (0o100000 | _FILE_MODE) << 16
    return info


def client_artifact(
    source_root: Path = SOURCE_ROOT, *, app: Shipment | None = None
) -> tuple[bytes, str]:
    """The artifact's bytes and their SHA-256 (hex). ``app``: the user's app code a device
    imports (its task) and its pins, added beside ours (``sfl.build.app_code``)."""
    entries = {
        path.relative_to(source_root).as_posix(): path.read_bytes()
        for path in client_files(source_root)
    }
    requirements = edge_requirements(source_root)
    if app is not None and not app.empty:
        clash = sorted(set(app.files) & set(entries))
        if clash:
            raise ArtifactError(f"the app's files {clash} would replace the client's own")
        entries.update(app.files)
        requirements += app.requirements_text("The app's pins (requirements-task.txt)")
    entries[REQUIREMENTS_FILE] = requirements.encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(entries):
            archive.writestr(_entry(name), entries[name])
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def build_client_artifact(
    path: Path, *, source_root: Path = SOURCE_ROOT, app: Shipment | None = None
) -> ArtifactInfo:
    """Write the artifact zip to ``path`` (e.g. ``.../sfl-edge-client.zip``) for an S3 asset."""
    if path.suffix != ".zip":
        raise ArtifactError(f"{path}: the artifact must be a .zip (the recipe unpacks it as ZIP)")
    data, digest = client_artifact(source_root, app=app)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return ArtifactInfo(path=path, sha256=digest)
