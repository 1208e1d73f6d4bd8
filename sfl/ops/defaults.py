"""What the operator's commands assume when not told: which stack, how many rows.

Kept apart from what reads the federation so that the command line's parsers (and
``sfl --help``) can say these defaults without loading boto3.
"""

from __future__ import annotations

#: The stack ``make deploy`` creates (``sfl_infra.stack_prefix`` "Sfl" + "-Federation").
DEFAULT_STACK = "Sfl-Federation"
#: The environment variable that names another stack.
STACK_ENV = "SFL_STACK"
#: What ``rounds`` and ``models list`` show unless asked for more.
DEFAULT_LAST = 20
