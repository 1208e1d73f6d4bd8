"""Round notices: what the initiator pushes when a round opens, on which topic, and how it reads.

A notice tells subscribed devices "poll now": the assignment object in S3 stays the
authority, and a device acts on nothing a notice says. It is small (a few hundred bytes,
never the list of picked clients, so its price stays one IoT Core message per device
whatever the round's size) and goes to one MQTT topic per deployment and experiment
(``notice_topic``). The topic's name flows like the stack's other names: the stack computes it
and hands it to the initiator (environment) and to devices (the component's ``Setenv``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sfl.core import layout

#: The variable that names the topic, for the initiator and for the edge client alike.
NOTICE_TOPIC_ENV = "SFL_NOTICE_TOPIC"
#: A notice is read only up to this size; anything larger is not one.
MAX_NOTICE_BYTES = 1_024
# A topic level of ours: no MQTT wildcard ('+', '#'), no '$' (reserved topics), no '/', and
# none of the characters Greengrass's authorization treats specially ('*', '?').
_LEVEL = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_FIELDS = ("experiment", "round", "base_version", "assignment_key")


class NoticeUnreadable(ValueError):
    """A payload on the notice topic that is not a round notice (ignored, never fatal)."""


def notice_topic(deployment: str, experiment: str) -> str:
    """``sfl/<deployment>/<experiment>/rounds``: the stack's name (unique per account and
    region, as IoT topics are) and the experiment, so two stacks never wake each other's
    devices. Both must be plain words: the IoT policy and the recipe's IPC access control name
    the topic literally, so a wildcard in it would widen both."""
    for what, level in (("deployment", deployment), ("experiment", experiment)):
        if not _LEVEL.match(level):
            raise ValueError(
                f"{what} {level[:140]!r} cannot be a topic level: use 1-128 letters, digits, "
                "'_' or '-'"
            )
    return f"sfl/{deployment}/{experiment}/rounds"


@dataclass(frozen=True)
class RoundNotice:
    """Round ``round`` of ``experiment`` opened from ``base_version``; its assignment is at
    ``assignment_key`` of the models bucket."""

    experiment: str
    round: int
    base_version: int
    assignment_key: str = layout.ASSIGNMENT_KEY

    def encode(self) -> bytes:
        return json.dumps(
            {name: getattr(self, name) for name in _FIELDS}, separators=(",", ":")
        ).encode()

    @classmethod
    def decode(cls, payload: bytes) -> RoundNotice:
        """The notice in ``payload``; ``NoticeUnreadable`` with the reason otherwise."""
        if len(payload) > MAX_NOTICE_BYTES:
            raise NoticeUnreadable(f"{len(payload)} bytes, over {MAX_NOTICE_BYTES}")
        try:
            body: Any = json.loads(payload, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise NoticeUnreadable(f"not JSON: {type(e).__name__}") from e
        if not isinstance(body, dict) or set(body) != set(_FIELDS):
            raise NoticeUnreadable(f"not an object with exactly {', '.join(_FIELDS)}")
        experiment, number, base, key = (body[name] for name in _FIELDS)
        if not isinstance(experiment, str) or not _LEVEL.match(experiment):
            raise NoticeUnreadable("'experiment' is not an experiment name")
        for name, value in (("round", number), ("base_version", base)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**12:
                raise NoticeUnreadable(f"{name!r} is not a number in 0..10**12")
        if key != layout.ASSIGNMENT_KEY:
            raise NoticeUnreadable("'assignment_key' is not the assignment's key")
        return cls(experiment, number, base, key)


def _no_constant(name: str) -> Any:
    raise NoticeUnreadable(f"{name} is not a number JSON allows")
