"""A user's app as the infra tests write it: outside this repository, a package ``myapp``
with the user's own task (and model), selection, quorum and a data file, and a pin.

``make_user_app`` starts from ``sfl new`` and adds these, as a user would; ``write_app``
writes only the package (for the plan tests, which read sources and never import them).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from sfl.build.app_code import APP_REQUIREMENTS

TASK = '''
"""My task: a small MLP on my data."""
from __future__ import annotations

from torch import nn

from sfl.learning.tasks.digits import DigitsTask
from myapp.model import make_net


class Task(DigitsTask):
    name = "myapp"

    def new_model(self) -> nn.Module:
        return make_net()

    def load_central_data(self):
        from sklearn.datasets import load_digits  # simulation only: never on a device

        del load_digits
        return super().load_central_data()
'''
MODEL = """
from torch import nn


def make_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
"""
SELECTION = '''
"""Pick by name: plain Python over the registry's records."""
import random

from sfl.core.selection import select_random


def pick(*args, **kwargs):
    return select_random(*args, **kwargs)
'''
QUORUM = """
from sfl.core.quorum import min_fraction

half = min_fraction
"""


def write_app(root: Path, files: dict[str, str] | None = None) -> Path:
    """A user's app: package ``myapp`` with a task, a model, a selection and a quorum."""
    sources = {
        "myapp/__init__.py": "",
        "myapp/task.py": TASK,
        "myapp/model.py": MODEL,
        "myapp/selection.py": SELECTION,
        "myapp/quorum.py": QUORUM,
        "myapp/labels.txt": "zero\none\n",
        **(files or {}),
    }
    for name, text in sources.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


PILLOW = f"pillow=={importlib.metadata.version('pillow')}"
#: The plug-ins the synthesized user app names, context ``sfl`` keys.
PLUGINS = {
    "task": "myapp.task:Task",
    "selection": "myapp.selection:pick",
    "quorum": "myapp.quorum:half",
}


def make_user_app(root: Path) -> Path:
    """``sfl new`` (package ``myapp``), then the user's own code and a pin."""
    from sfl.build.new_app import create_app

    create_app(root, package="myapp")
    return write_app(root, {APP_REQUIREMENTS: PILLOW + "\n"})
