"""Fixtures: the stack synthesized once per test session, and a bare stack per test.

The app is built exactly as ``app.py`` builds it (``infra.stack.build_app`` with the context
in ``cdk.json``, cdk-nag included), into a temporary cloud assembly.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aws_cdk import Stack
from stack_template import Synthesized, bare_app_stack, cdk_context, synthesized_stack
from user_app import PLUGINS, make_user_app


@pytest.fixture(scope="session")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    return synthesized_stack(tmp_path_factory.mktemp("cdk.out"))


@pytest.fixture(scope="session")
def user_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A user's app outside this repository (``user_app.make_user_app``), importable here,
    where the tests play the devices and the averager."""
    root = make_user_app(tmp_path_factory.mktemp("apps") / "myapp")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


@pytest.fixture(scope="session")
def user_app_synthesized(user_app: Path, tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    """That app's stack: this repository's cdk.json with the app's plug-ins named."""
    context = cdk_context()
    context["sfl"] = {**context["sfl"], **PLUGINS}
    return synthesized_stack(tmp_path_factory.mktemp("app-cdk.out"), context, app_root=user_app)


@pytest.fixture
def bare_stack() -> Stack:
    """An empty stack in its own app, for building one construct in isolation."""
    return bare_app_stack()
