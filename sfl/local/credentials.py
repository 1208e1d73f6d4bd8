"""Local credentials served the way Greengrass's token exchange service serves them.

Local mode never puts access keys in code, files or environment variables. Every local
process (handlers, edge clients, tests) finds this endpoint through
``AWS_CONTAINER_CREDENTIALS_FULL_URI`` + ``AWS_CONTAINER_AUTHORIZATION_TOKEN``, the same two
variables a Greengrass core device sets for its components, and boto3's own container
credentials provider fetches short-lived credentials from it. The credentials are random
per endpoint; moto accepts any signature, and they are only ever sent to 127.0.0.1.
"""

from __future__ import annotations

import json
import secrets
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: The path the Greengrass token exchange service serves credentials on.
TES_PATH = "/2016-11-01/credentialprovider/"


class CredentialEndpoint:
    """A loopback HTTP endpoint serving container credentials to requests that carry the
    right ``Authorization`` token; everything else gets 403. Counts what it served and refused.

    Use as ``with CredentialEndpoint() as creds: env = creds.env()``.
    """

    def __init__(self, *, token: str | None = None, lifetime_seconds: int = 3600) -> None:
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self.lifetime_seconds = lifetime_seconds
        self.served = 0
        self.refused = 0
        self._lock = threading.Lock()
        # Generated here, never fixed in code; AWS's access key id format (20 upper-case
        # alphanumerics, "ASIA" for temporary credentials) so tools that check shapes accept it.
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
        self._access_key_id = "ASIA" + "".join(secrets.choice(alphabet) for _ in range(16))
        self._secret = secrets.token_urlsafe(30)
        self._session_token = secrets.token_urlsafe(48)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != TES_PATH or self.headers.get("Authorization") != endpoint.token:
                    with endpoint._lock:
                        endpoint.refused += 1
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with endpoint._lock:
                    endpoint.served += 1
                body = json.dumps(endpoint._document()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{TES_PATH}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="local-credentials", daemon=True
        )

    def _document(self) -> dict[str, str]:
        expires = datetime.now(UTC) + timedelta(seconds=self.lifetime_seconds)
        return {
            "AccessKeyId": self._access_key_id,
            "SecretAccessKey": self._secret,
            "Token": self._session_token,
            "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def env(self) -> dict[str, str]:
        """The variables boto3's container credentials provider reads."""
        return {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": self.url,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": self.token,
        }

    def __enter__(self) -> CredentialEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which must be running
            self._server.shutdown()
        self._server.server_close()
