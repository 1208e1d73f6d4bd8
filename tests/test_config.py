"""One config definition: typed defaults, clear errors, the same values through every sink."""

from __future__ import annotations

import pytest

from sfl.core.config import ConfigError, FederationConfig, describe


def test_defaults_round_trip_through_lambda_environment() -> None:
    config = FederationConfig(local_epochs=3, lr=0.01, quorum="min_fraction")
    assert FederationConfig.from_env(config.to_env()) == config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"quorum": "most"},
            "config key 'quorum': 'most' is not allowed; "
            "allowed: one of all_answered, min_fraction",
        ),
        (
            {"fraction": 1.5},
            "config key 'fraction': 1.5 is not allowed; allowed: a number from 0.01 to 1",
        ),
        ({"local_epochs": "two"}, "config key 'local_epochs': 'two' is not a int"),
        ({"experiment": "a/b"}, "config key 'experiment'"),
        ({"local_epoch": 2}, "unknown config key(s) 'local_epoch'"),
    ],
)
def test_bad_values_name_the_key_value_and_what_is_allowed(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        FederationConfig.from_mapping(values, source="cdk.json context 'sfl'")
    assert message in str(caught.value)


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="SFL_LR"):
        FederationConfig.from_env({"SFL_LR": "fast"})


def test_custom_strategy_import_path_is_allowed() -> None:
    assert FederationConfig(selection="my_pkg.select:pick").selection == "my_pkg.select:pick"


def test_every_key_is_described() -> None:
    keys = [row[0] for row in describe()]
    assert "local_epochs" in keys and "quorum" in keys
    assert all(row[2] and row[3] for row in describe())
