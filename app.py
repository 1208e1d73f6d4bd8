#!/usr/bin/env python3
"""The CDK app: the federation stack, configured by cdk.json context ('sfl', 'sfl_infra')."""

from __future__ import annotations

import sys
from pathlib import Path

from aws_cdk import App

from infra.stack import build_app
from sfl.core.config import ConfigError

app = App()
try:
    build_app(app, app_root=Path(__file__).resolve().parent)
except ConfigError as e:
    sys.exit(f"cdk.json context: {e}")
app.synth()
