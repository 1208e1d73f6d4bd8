"""What a Lambda handler needs from its environment, built once per distinct environment.

Shared by both handlers (torch-free, so the initiator's zip can carry it).
"""

from __future__ import annotations

import os
from functools import lru_cache

from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames
from sfl.state.aws import AwsClients, make_clients

Services = tuple[AwsClients, ResourceNames, FederationConfig]

# The handlers' metrics and log identity; the stack's alarms and environment use the same.
METRICS_NAMESPACE = "ServerlessFederatedLearning"
INITIATOR_SERVICE = "sfl-initiator"
AVERAGER_SERVICE = "sfl-averager"
#: Seconds the newest round has been open, published by the initiator on every run.
OPEN_ROUND_AGE_METRIC = "OpenRoundAge"
#: Clients seen recently, published by the initiator when it counted them.
ACTIVE_DEVICES_METRIC = "ActiveDevices"
#: The new model's accuracy on the held-out set, published by the averager (sfl.server.evaluation).
GLOBAL_ACCURACY_METRIC = "GlobalModelAccuracy"

# Variables the stack sets beside the ``SFL_*`` names and settings (``ResourceNames``,
# ``FederationConfig``): the functions the averager invokes, by name.
#: The initiator, chained as soon as a round finishes.
INITIATOR_FUNCTION_ENV = "SFL_INITIATOR_FUNCTION"
#: The shard function (``sfl.server.shards``), deployed when ``aggregation_shard_above`` is set.
SHARD_FUNCTION_ENV = "SFL_SHARD_FUNCTION"

_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",  # local mode: a new endpoint means new clients
)


@lru_cache(maxsize=8)
def _services(env_key: tuple[tuple[str, str], ...]) -> Services:
    env = dict(env_key)
    return make_clients(), ResourceNames.from_env(env), FederationConfig.from_env(env)


def services() -> Services:
    """Clients, names and config from ``SFL_*`` and the AWS endpoint/region variables."""
    env = tuple(
        sorted((k, v) for k, v in os.environ.items() if k.startswith("SFL_") or k in _ENV_KEYS)
    )
    return _services(env)
