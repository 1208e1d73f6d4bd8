"""Fixtures: the stack synthesized once per test session, and a bare stack per test.

The app is built exactly as ``app.py`` builds it (``infra.stack.build_app`` with the context
in ``cdk.json``, cdk-nag included), into a temporary cloud assembly.
"""

from __future__ import annotations

import json

import pytest
from aws_cdk import Stack, assertions
from stack_template import Synthesized, bare_app_stack, synthesize


@pytest.fixture(scope="session")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    stack, assembly_dir = synthesize(tmp_path_factory.mktemp("cdk.out"))
    template_path = assembly_dir / stack.template_file
    template_json = json.loads(template_path.read_text())
    return Synthesized(
        stack=stack,
        template=assertions.Template.from_json(template_json),
        template_json=template_json,
        template_path=template_path,
        assembly_dir=assembly_dir,
    )


@pytest.fixture
def bare_stack() -> Stack:
    """An empty stack in its own app, for building one construct in isolation."""
    return bare_app_stack()
