"""The averager image's Docker build context, staged: exactly what the image holds.

The context is written fresh into a folder beside the cloud assembly: the Dockerfile, the
Lambda's pins and handler, the packages of ours the averager runs (never local mode, the
CLI, the operator tools or the build tools), and under ``app/`` the app's code and pins that
the averager imports (``sfl.build.app_code``) with a manifest naming them. Same sources, same
bytes, so the asset's hash changes only when the image would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sfl.build import artifact
from sfl.build.app_code import AVERAGER_PACKAGES, AVERAGER_REQUIREMENTS, Shipment

AVERAGER_DIR = AVERAGER_REQUIREMENTS.parent
#: Copied from the framework's checkout, at the context's root.
FRAMEWORK_FILES = ("Dockerfile", "handler.py", "requirements.txt")
APP_DIR = "app"
APP_REQUIREMENTS = "app-requirements.txt"
#: Lands in the function's task root: which app code the image holds.
APP_MANIFEST = "sfl-app.json"


def stage_build_context(
    out_dir: Path, *, app: Shipment, source_root: Path = artifact.SOURCE_ROOT
) -> Path:
    """Write the build context into ``out_dir`` (emptied first) and return it."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name in FRAMEWORK_FILES:
        _write(out_dir / name, (source_root / AVERAGER_DIR / name).read_bytes())
    _write(out_dir / "sfl" / "__init__.py", (source_root / "sfl" / "__init__.py").read_bytes())
    for package in AVERAGER_PACKAGES:
        folder = source_root.joinpath(*package.split("."))
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" not in path.parts:
                _write(out_dir / path.relative_to(source_root), path.read_bytes())
    _write(
        out_dir / APP_REQUIREMENTS,
        app.requirements_text("The app's pins (requirements-task.txt)").encode(),
    )
    for name, data in app.files.items():
        _write(out_dir / APP_DIR / name, data)
    manifest = {"modules": list(app.modules), "files": sorted(app.files)}
    _write(out_dir / APP_DIR / APP_MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return out_dir


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
