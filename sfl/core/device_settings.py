"""The settings a device owns in the edge client component's configuration.

A Greengrass deployment's configuration merge may change these per device (the stack's
``sfl_infra.device_configuration`` sets them for every device); the recipe
(:mod:`sfl.build.recipes`) hands each to a lifecycle step as an environment variable.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigurationKey:
    """A device-owned ``DefaultConfiguration`` key and the variable a lifecycle step sets."""

    key: str
    variable: str
    step: str  # "Install" or "Run"
    doc: str


CONFIGURATION_KEYS = (
    ConfigurationKey(
        "endpointUrl", "AWS_ENDPOINT_URL", "Run", "another AWS endpoint; '' means AWS's own"
    ),
    ConfigurationKey("dataDir", "SFL_DATA_DIR", "Run", "this device's data directory"),
    ConfigurationKey(
        "pythonInterpreter", "SFL_INSTALL_PYTHON", "Install", "Python >= 3.10 for the venv"
    ),
    ConfigurationKey(
        "systemSitePackages",
        "SFL_INSTALL_SYSTEM_SITE_PACKAGES",
        "Install",
        "'true': the venv sees the interpreter's site-packages",
    ),
    ConfigurationKey(
        "extraSitePackages",
        "SFL_INSTALL_EXTRA_SITE_PACKAGES",
        "Install",
        "':'-separated directories of preinstalled packages the venv sees",
    ),
    ConfigurationKey(
        "localDpClip",
        "SFL_LOCAL_DP_CLIP",
        "Run",
        "local DP: this device clips its change to this L2 norm before upload; 0: off",
    ),
    ConfigurationKey(
        "localDpNoiseMultiplier",
        "SFL_LOCAL_DP_NOISE_MULTIPLIER",
        "Run",
        "local DP: Gaussian noise of this times localDpClip on the change (docs/privacy.md)",
    ),
    ConfigurationKey("pipOptions", "SFL_INSTALL_PIP_OPTIONS", "Install", "extra pip options"),
    ConfigurationKey(
        "torchIndexUrl",
        "SFL_INSTALL_TORCH_INDEX_URL",
        "Install",
        "index torch alone comes from (default PyTorch's CPU wheels); '' : the usual index",
    ),
)
