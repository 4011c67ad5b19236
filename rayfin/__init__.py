"""rayfin: a distributed LLM and a real-time market ML pipeline on one Ray cluster.

Subpackages, by concern:

- :mod:`rayfin.llm`: model assets, and (later) the distributed client and swarm.
- :mod:`rayfin.actors`: Ray actors (block servers, stream consumers).
- :mod:`rayfin.stream`: Kafka plumbing, including the embedded broker.
- :mod:`rayfin.features`, :mod:`rayfin.trading`, :mod:`rayfin.serve`: the market pipeline.
- :mod:`rayfin.datasets`: the bundled real market data.
- :mod:`rayfin.sdk`: the Python client of the HTTP API; :func:`connect` makes one.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayfin.sdk import connect

try:
    __version__ = version("rayfin")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "connect"]


def __getattr__(name: str) -> Any:
    # rayfin.connect is rayfin.sdk.connect, imported on first use: `import rayfin` (which
    # every subpackage does) must not pull in httpx and the API's schemas.
    if name == "connect":
        from rayfin.sdk import connect

        return connect
    raise AttributeError(f"module 'rayfin' has no attribute {name!r}")
