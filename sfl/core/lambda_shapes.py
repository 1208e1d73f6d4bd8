"""The two Lambdas' default memory sizes and architectures, in one torch-free place.

The stack (``infra.config`` defaults, ``infra.rounds`` architectures) and the cost model
(``sfl.core.cost``) both read them here; ``cdk.json`` (``sfl_infra.*_memory_mb``) may override the
memory of a deployed stack, and a running function knows its own from its environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class FunctionShape:
    memory_mb: int
    architecture: str  # "arm64" | "x86_64", Lambda's names


# Pure Python, boto3 only: the cheaper Arm architecture.
INITIATOR: Final = FunctionShape(memory_mb=256, architecture="arm64")
# torch (CPU) in a container image built for x86_64.
AVERAGER: Final = FunctionShape(memory_mb=2_048, architecture="x86_64")
