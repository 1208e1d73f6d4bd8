"""How the operator's commands find a running ``sfl local up`` from any shell.

``sfl local up`` records its endpoint, region and the loopback credential endpoint (URL and
token, as a Greengrass device's token exchange service gives them) in a file only this user
can read, and removes it when it stops. A command given that endpoint reads the record and
connects with those credentials and that region: nothing to export, and the user's own AWS
configuration and credentials are neither read nor changed. Whether anything answers at a
local endpoint is asked first, in well under a second, so a stopped federation is one line.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from botocore.credentials import ContainerProvider

#: Where the record lives (default: ``$XDG_STATE_HOME/sfl`` or ``~/.local/state/sfl``).
STATE_DIR_ENV = "SFL_STATE_DIR"
RECORD_NAME = "local-federation.json"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
PROBE_SECONDS = 0.5


@dataclass(frozen=True)
class LocalEndpoint:
    endpoint_url: str
    region: str
    stack: str
    credentials_uri: str
    credentials_token: str
    pid: int
    log_path: str = ""  # the functions' log (JSON lines), for `sfl logs`

    def credential_provider(self) -> ContainerProvider:
        """boto3's own container-credentials provider, pointed at the local credential
        endpoint as a Greengrass device's is at its token exchange service (fetched and
        refreshed by botocore; no environment variable has to carry it, no key is held)."""
        if urlsplit(self.credentials_uri).scheme != "http" or not is_local(self.credentials_uri):
            raise ValueError(f"{self.credentials_uri} is not a loopback http URL")
        return ContainerProvider(
            environ={
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": self.credentials_uri,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN": self.credentials_token,
            }
        )


def state_dir() -> Path:
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sfl"


def record(endpoint: LocalEndpoint) -> Path:
    """Write the record (mode 0600: it holds the credential endpoint's token)."""
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RECORD_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(endpoint), f)
    return path


def forget(endpoint_url: str) -> None:
    """Remove the record if it is still this federation's."""
    found = recorded()
    if found is not None and found.endpoint_url == endpoint_url:
        (state_dir() / RECORD_NAME).unlink(missing_ok=True)


def recorded() -> LocalEndpoint | None:
    try:
        data = json.loads((state_dir() / RECORD_NAME).read_text())
        return LocalEndpoint(**data)
    except (OSError, ValueError, TypeError):
        return None


def is_local(endpoint_url: str) -> bool:
    return (urlsplit(endpoint_url).hostname or "") in LOOPBACK


def answers(endpoint_url: str) -> bool:
    """Whether anything accepts a connection at the endpoint's host and port."""
    parts = urlsplit(endpoint_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False
