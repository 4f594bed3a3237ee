"""Runs wherever requests are submitted: the Python client, ``edgepipe-submit`` and its report.

    from edgepipe.agent.client import Client
"""

from edgepipe.agent.client.client import (
    Client,
    ClientError,
    RemoteError,
    RequestTimeout,
    Result,
    default_client_id,
)

__all__ = ["Client", "ClientError", "RemoteError", "RequestTimeout", "Result", "default_client_id"]
