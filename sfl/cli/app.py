"""An app's folder as the commands run in it: its packages importable, its cdk.json's
federation the base configuration (``sfl simulate``, ``sfl task check``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def import_from(app: Path) -> None:
    """Put the app's folder first on the import path, for this process and its children
    (a simulation's worker processes), so the plug-ins it names by import path load."""
    root = str(app.resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p
    )


def federation_keys(app: Path, *, skip: frozenset[str] = frozenset()) -> dict[str, tuple[str, str]]:
    """The app's ``cdk.json`` context ``sfl`` as text keyed like ``--set`` (key -> (text,
    where)), minus ``skip``; the app's folder becomes importable. No cdk.json: nothing."""
    from sfl.core.deployment import FEDERATION_CONTEXT_KEY, context_mapping

    cdk_json = app / "cdk.json"
    if not cdk_json.is_file():
        return {}
    try:
        context = json.loads(cdk_json.read_text(encoding="utf-8")).get("context", {})
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{cdk_json}: not a JSON object with a 'context' ({e})") from e
    where = f"{cdk_json} context {FEDERATION_CONTEXT_KEY!r}"
    raw = context_mapping(context.get(FEDERATION_CONTEXT_KEY), FEDERATION_CONTEXT_KEY)
    import_from(app)
    return {
        key: (value if isinstance(value, str) else json.dumps(value), where)
        for key, value in raw.items()
        if key not in skip
    }
