"""The recipe's IPC access control as the Greengrass nucleus enforces it.

A component's ``SubscribeToIoTCore`` request reaches the nucleus's ``MqttProxyIPCAgent``,
which asks ``AuthorizationHandler.isAuthorized("aws.greengrass.ipc.mqttproxy",
Permission(operation, principal=component, resource=topic), MQTT_STYLE)``. This file plays
that path as the nucleus's source (aws-greengrass/aws-greengrass-nucleus) writes it:

- ``AuthorizationPolicyParser``: each component's ``configuration/accessControl`` maps a
  destination service to policies (id -> operations, resources); the principal is the
  component that holds the policy.
- ``AuthorizationHandler``: the operations a destination registered (the MQTT proxy:
  ``aws.greengrass#PublishToIoTCore``, ``aws.greengrass#SubscribeToIoTCore``, ``*``); a request
  for an operation not registered fails; lookups try (principal, operation), (principal,
  ``*``), (``*``, operation), (``*``, ``*``).
- ``AuthorizationModule.validateResource``: an unescaped ``?`` makes a resource invalid.
- ``WildcardTrie`` (``add``, ``matchesMQTT``): ``*`` a glob, ``#`` and ``+`` MQTT wildcards
  only where MQTT allows them, ``${c}`` escapes; a literal resource matches itself only.

The component's configuration is the one the nucleus resolves at deployment
(``tests/test_nucleus.resolve_configuration``: running values, the version's defaults, the
deployment's merge).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfl.build.recipes import MQTT_PROXY_SERVICE, SUBSCRIBE_TO_IOT_CORE, build_recipe
from sfl.core.config import FederationConfig
from sfl.core.notices import notice_topic
from sfl.core.resources import ResourceNames
from tests.test_nucleus import resolve_configuration

COMPONENT = "com.example.sfl.EdgeClient"
TOPIC = notice_topic("Sfl-Prod", "default")
PUBLISH_TO_IOT_CORE = "aws.greengrass#PublishToIoTCore"
ANY = "*"
# MqttProxyIPCService registers its operations with the handler (registerComponent adds '*').
REGISTERED = {MQTT_PROXY_SERVICE: {PUBLISH_TO_IOT_CORE, SUBSCRIBE_TO_IOT_CORE, ANY}}


class NotAuthorized(Exception):
    """AuthorizationException: the nucleus answers the component UnauthorizedError."""


# --- WildcardTrie, as the nucleus writes it ---------------------------------------------------

_GLOB, _MULTI, _SINGLE, _SEP = "*", "#", "+", "/"


def _escaped(text: str) -> str:
    """``getActualChar``: the character in ``${c}`` at the start of ``text``, else ''."""
    if len(text) >= 4 and text[0] == "$" and text[1] == "{" and text[3] == "}":
        return text[2]
    return ""


@dataclass
class WildcardTrie:
    is_terminal: bool = False
    is_terminal_level: bool = False
    is_wildcard: bool = False
    is_mqtt_wildcard: bool = False
    match_all: bool = False
    children: dict[str, WildcardTrie] = field(default_factory=dict)

    def child(self, key: str) -> WildcardTrie:
        return self.children.setdefault(key, WildcardTrie())

    def add(self, subject: str | None) -> None:
        if subject is None:
            return
        if subject == _GLOB:
            node = self.child(_GLOB)
            node.match_all = node.is_terminal = node.is_wildcard = True
            return
        if subject == _MULTI:
            node = self.child(_MULTI)
            node.match_all = node.is_terminal = node.is_mqtt_wildcard = True
            return
        if subject == _SINGLE:
            node = self.child(_SINGLE)
            node.is_terminal = node.is_mqtt_wildcard = True
            return
        if subject.startswith(_SINGLE + _SEP):
            node = self.child(_SINGLE)
            node.is_mqtt_wildcard = True
            node._add(subject[1:], True)
        self._add(subject, True)

    def _add(self, subject: str, is_terminal: bool) -> WildcardTrie:
        if not subject:
            self.is_terminal |= is_terminal
            return self
        current, built, i, n = self, [], 0, len(subject)
        while i < n:
            char = subject[i]
            if char == _GLOB:
                current = current._add("".join(built), False).child(_GLOB)
                current.is_wildcard = True
                if i == n - 1:
                    current.is_terminal = is_terminal
                    return current
                return current._add(subject[i + 1 :], True)
            if char == _MULTI:
                terminal_level = current._add("".join(built), False)
                current = terminal_level.child(_MULTI)
                if i == n - 1:
                    current.is_terminal = True
                    if i > 0 and subject[i - 1] == _SEP:
                        current.is_mqtt_wildcard = current.match_all = True
                        terminal_level.is_terminal_level = True
                    return current
                return current._add(subject[i + 1 :], True)
            if char == _SINGLE:
                current = current._add("".join(built), False).child(_SINGLE)
                if i == n - 1:
                    current.is_terminal = True
                    if i > 0 and subject[i - 1] == _SEP:
                        current.is_mqtt_wildcard = True
                    return current
                if i > 0 and subject[i - 1] == _SEP and subject[i + 1] == _SEP:
                    current.is_mqtt_wildcard = True
                return current._add(subject[i + 1 :], True)
            if char == "$":
                actual = _escaped(subject[i:])
                if actual:
                    built.append(actual)
                    i += 4
                    continue
            built.append(char)
            i += 1
        current = current.child("".join(built))
        current.is_terminal |= is_terminal
        return current

    def matches_mqtt(self, text: str | None) -> bool:
        if text is None:
            return True
        if (self.is_wildcard and self.is_terminal) or (self.is_terminal and not text):
            return True
        if self.is_mqtt_wildcard and (self.match_all or (self.is_terminal and _SEP not in text)):
            return True
        pending: dict[str, WildcardTrie] = {}
        for key, value in self.children.items():
            if (value.is_wildcard and key == _GLOB) or (
                value.is_mqtt_wildcard and key in (_SINGLE, _MULTI)
            ):
                if value.matches_mqtt(text):
                    return True
                continue
            if text.startswith(key) and value.matches_mqtt(text[len(key) :]):
                return True
            terminal_key = key[:-1]
            if value.is_terminal_level:
                if text == terminal_key:
                    return True
                if text.endswith(terminal_key):
                    key = terminal_key
            if self.is_wildcard:
                found = text.find(key)
                while 0 <= found < len(text):
                    pending[text[found + len(key) :]] = value
                    found = text.find(key, found + 1)
            if self.is_mqtt_wildcard:
                found = text.find(key)
                while 0 <= found < len(text) and _SEP not in text[:found]:
                    pending[text[found + len(key) :]] = value
                    found = text.find(key, found + 1)
        if (self.is_wildcard or self.is_mqtt_wildcard) and pending:
            return any(value.matches_mqtt(rest) for rest, value in pending.items())
        return False


# --- the policies, parsed and looked up as the nucleus does ----------------------------------


def _valid_resource(resource: str) -> bool:
    """``AuthorizationModule.validateResource``."""
    if resource == "":
        return False
    i = 0
    while i < len(resource):
        if resource[i] == "$" and i + 1 < len(resource) and resource[i + 1] == "{":
            actual = _escaped(resource[i:])
            if actual not in ("*", "$", "?"):
                return False
            i += 3
        elif resource[i] == "?":
            return False
        i += 1
    return True


class Authorization:
    """The permission table of ``AuthorizationModule``, loaded from the services' configuration."""

    def __init__(self, services: Mapping[str, Mapping[str, Any]]) -> None:
        # destination -> principal -> operation -> trie
        self.table: dict[str, dict[str, dict[str, WildcardTrie]]] = {}
        for component, configuration in services.items():
            access = configuration.get("accessControl")
            if not isinstance(access, Mapping):
                continue
            for destination, policies in access.items():
                if destination not in REGISTERED:
                    continue  # isComponentRegistered fails: the policy is skipped
                for policy in policies.values():
                    operations = policy.get("operations") or []
                    if not operations:
                        continue  # "Policy operations are missing or invalid"
                    for operation in operations:
                        for resource in policy.get("resources") or [None]:
                            if resource is not None and not _valid_resource(resource):
                                continue
                            trie = (
                                self.table.setdefault(destination, {})
                                .setdefault(component, {})
                                .setdefault(operation, WildcardTrie())
                            )
                            trie.add(resource)

    def is_authorized(self, destination: str, principal: str, operation: str, topic: str) -> bool:
        if operation not in REGISTERED.get(destination, set()):
            raise NotAuthorized(f"operation {operation} is not registered with {destination}")
        for who, what in ((principal, operation), (principal, ANY), (ANY, operation), (ANY, ANY)):
            trie = self.table.get(destination, {}).get(who, {}).get(what)
            if trie is not None and trie.matches_mqtt(topic):
                return True
        raise NotAuthorized(
            f"Principal {principal} is not authorized to perform {destination}:{operation} "
            f"on resource {topic}"
        )


def subscribe_to_iot_core(auth: Authorization, component: str, topic: str) -> bool:
    """MqttProxyIPCAgent.SubscribeToIoTCoreOperationHandler.doAuthorization."""
    return auth.is_authorized(MQTT_PROXY_SERVICE, component, SUBSCRIBE_TO_IOT_CORE, topic)


def publish_to_iot_core(auth: Authorization, component: str, topic: str) -> bool:
    return auth.is_authorized(MQTT_PROXY_SERVICE, component, PUBLISH_TO_IOT_CORE, topic)


# --- the recipe's access control on a device -------------------------------------------------


def _deployed(
    running: Mapping[str, Any] | None = None, merge: Mapping[str, Any] | None = None
) -> Authorization:
    names = ResourceNames("models", "updates", "clients", "rounds")
    recipe = build_recipe(
        FederationConfig(),
        names,
        region="eu-west-1",
        component_name=COMPONENT,
        artifact_uri="s3://artifact-bucket/edge/sfl-edge-client.zip",
        artifact_sha256="0" * 64,
        notice_topic=TOPIC,
    )
    defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    configuration = resolve_configuration(running, defaults, merge, reset=("/accessControl",))
    return Authorization({COMPONENT: configuration, "com.example.Other": {}})


def test_the_component_may_subscribe_to_the_notice_topic() -> None:
    assert subscribe_to_iot_core(_deployed(), COMPONENT, TOPIC)


@pytest.mark.parametrize(
    "topic",
    [
        "sfl/Sfl-Prod/other/rounds",  # another experiment's
        "sfl/Sfl-Other/default/rounds",  # another stack's
        TOPIC + "/more",
        TOPIC[:-1],
        "sfl/+/default/rounds",  # a wildcard filter widening the subscription
        "sfl/Sfl-Prod/#",
        "#",
        "$aws/things/core-device-1/shadow/update",
    ],
)
def test_the_component_may_subscribe_to_nothing_else(topic: str) -> None:
    with pytest.raises(NotAuthorized, match="is not authorized"):
        subscribe_to_iot_core(_deployed(), COMPONENT, topic)


def test_the_component_may_not_publish_even_to_the_notice_topic() -> None:
    with pytest.raises(NotAuthorized):
        publish_to_iot_core(_deployed(), COMPONENT, TOPIC)


def test_another_component_gains_nothing_from_our_policy() -> None:
    with pytest.raises(NotAuthorized):
        subscribe_to_iot_core(_deployed(), "com.example.Other", TOPIC)


def test_an_old_version_s_topic_is_gone_after_the_stack_s_deployment() -> None:
    """A device that ran a version with another topic: the stack's deployment resets
    ``/accessControl`` (infra.edge), so only the new topic is allowed."""
    old = {
        "accessControl": {
            MQTT_PROXY_SERVICE: {
                "RoundNotices.old": {
                    "operations": [SUBSCRIBE_TO_IOT_CORE],
                    "resources": ["sfl/Sfl-Old/default/rounds"],
                }
            }
        }
    }
    auth = _deployed(running=old)
    assert subscribe_to_iot_core(auth, COMPONENT, TOPIC)
    with pytest.raises(NotAuthorized):
        subscribe_to_iot_core(auth, COMPONENT, "sfl/Sfl-Old/default/rounds")


# --- the matcher itself, on the nucleus's own examples ----------------------------------------


@pytest.mark.parametrize(
    ("resource", "topic", "allowed"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/b/c", "a/b/cd", False),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/x/c", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("a/*", "a/b/c", True),
        ("a+", "a+", True),  # '+' not alone in a level is a plain character
        ("a+", "ab", False),
        ("${*}", "*", True),
        ("${*}", "x", False),
    ],
)
def test_the_trie_matches_as_the_nucleus_s_does(resource: str, topic: str, allowed: bool) -> None:
    trie = WildcardTrie()
    trie.add(resource)
    assert trie.matches_mqtt(topic) is allowed


@given(st.text(alphabet=sorted(set(TOPIC) | set("+#*${}")), max_size=40))
def test_a_literal_topic_resource_matches_only_itself(topic: str) -> None:
    trie = WildcardTrie()
    trie.add(TOPIC)
    assert trie.matches_mqtt(topic) is (topic == TOPIC)


def _policies(
    resources: Iterable[str], operations: Iterable[str] = (SUBSCRIBE_TO_IOT_CORE,)
) -> dict[str, Any]:
    return {
        "accessControl": {
            MQTT_PROXY_SERVICE: {
                "p": {"operations": list(operations), "resources": list(resources)}
            }
        }
    }


def test_a_question_mark_makes_a_resource_invalid_and_so_grants_nothing() -> None:
    auth = Authorization({COMPONENT: _policies(["a?b"])})
    with pytest.raises(NotAuthorized):
        subscribe_to_iot_core(auth, COMPONENT, "a?b")
