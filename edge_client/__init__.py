"""The edge client: register, heartbeat, poll for rounds, train locally, upload updates.

Runs as a Greengrass V2 component (credentials from the token exchange service) or on any
machine with ``python -m edge_client``.
"""
