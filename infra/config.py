"""The CDK app's reading of its settings.

What the stack is built from, its keys, defaults and checks, is torch-free data in
:mod:`sfl.core.deployment` (context ``sfl_infra``) and :mod:`sfl.core.config` (context
``sfl``), which ``sfl cost`` and ``sfl recipes`` read too. Here only what the CDK app alone
needs beside it: the Python version both Lambdas are built for.
"""

from __future__ import annotations

from sfl.core.deployment import (
    CONTEXT_KEY,
    FEDERATION_CONTEXT_KEY,
    LOG_RETENTION_DAYS,
    InfraConfig,
    StackConfig,
    describe,
)

__all__ = [
    "CONTEXT_KEY",
    "FEDERATION_CONTEXT_KEY",
    "LAMBDA_PYTHON_VERSION",
    "LOG_RETENTION_DAYS",
    "InfraConfig",
    "StackConfig",
    "describe",
]

# Both Lambdas run this Python; the averager's Dockerfile receives it as a build argument.
LAMBDA_PYTHON_VERSION = "3.14"
