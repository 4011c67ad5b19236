"""The Python SDK for quant researchers: a typed client of the rayfin HTTP API and the
research workflow from history to a deployed model (see ``docs/sdk.md``).

    import rayfin

    with rayfin.connect("http://127.0.0.1:8000", api_key) as client:
        print(client.score_frame(features).results[-1].decision)

:mod:`rayfin.sdk.research` holds the workflow: ``load_history``, ``compute_features``,
``train``, ``backtest`` and ``deploy``.
"""

from rayfin.errors import ApiConnectionError, ApiRequestError
from rayfin.sdk.client import RayfinClient, connect, frame_rows

__all__ = ["ApiConnectionError", "ApiRequestError", "RayfinClient", "connect", "frame_rows"]
