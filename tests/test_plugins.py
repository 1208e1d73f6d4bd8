"""The plug-in registry: every registered name resolves, and every reader uses the registry."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sfl.cli.main import build_parser
from sfl.core import params, plugins
from sfl.core.config import ConfigError, FederationConfig
from sfl.core.quorum import get_quorum_policy
from sfl.core.selection import get_selection_strategy
from sfl.learning.rules.aggregation import AggregationRule, get_aggregator
from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import TrainingTask

#: Parameters a registered task cannot do without (the tabular task's input width).
REQUIRED_TASK_PARAMS = {"tabular": {"num_features": 4}}
LOADERS = {
    "selection": get_selection_strategy,
    "aggregation": get_aggregator,
    "quorum": get_quorum_policy,
}


@pytest.mark.parametrize(
    ("kind", "name"), [(k, n) for k in plugins.KINDS for n in plugins.names(k)]
)
def test_every_registered_name_resolves_and_is_valid_config(kind: str, name: str) -> None:
    loaded = plugins.load(kind, name)

    assert callable(loaded)
    given = REQUIRED_TASK_PARAMS.get(name, {}) if kind == "task" else {}
    if kind == "task":
        assert isinstance(load_task(name, given), TrainingTask)
    else:
        assert LOADERS[kind](name) is loaded
    extra = {"task_params": given} if given else {}
    FederationConfig.from_mapping({kind: name, **extra})  # config validation accepts it


def test_config_refuses_an_unregistered_name_with_the_registrys_list() -> None:
    with pytest.raises(
        ConfigError, match="one of fast_clients, utility, random, all, poisson, or an import"
    ):
        FederationConfig(selection="fastest")


def test_cli_help_lists_the_registered_names() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["simulate"].format_help()  # type: ignore[union-attr]

    for name in (*plugins.names("task"), *plugins.names("selection")):
        assert name in help_text


def test_reading_the_registry_imports_no_torch() -> None:
    code = (
        "import sys; from sfl.core import plugins, config; "
        "[plugins.import_path(k, n) for k in plugins.KINDS for n in plugins.names(k)]; "
        "config.FederationConfig.from_mapping({'aggregation': 'krum', 'aggregation_params': "
        "{'keep': 2}}); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize("name", plugins.names("aggregation"))
def test_every_builtin_rule_declares_the_identity_it_is_registered_with(name: str) -> None:
    rule = get_aggregator(name)()

    assert isinstance(rule, AggregationRule)
    assert rule.name == name
    assert rule.Params is params.RULES[name].params  # config checks what the rule will check
    assert rule.params == rule.Params()  # built from defaults
    assert rule.stateful == rule.abilities.stateful
    assert not (rule.abilities.sums_in_shards and rule.abilities.reads_all_at_once)
