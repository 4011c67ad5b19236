"""rayfin: a distributed LLM and a real-time market ML pipeline on one Ray cluster.

Subpackages, by concern:

- :mod:`rayfin.llm`: model assets, and (later) the distributed client and swarm.
- :mod:`rayfin.actors`: Ray actors (block servers, stream consumers).
- :mod:`rayfin.stream`: Kafka plumbing, including the embedded broker.
- :mod:`rayfin.features`, :mod:`rayfin.trading`, :mod:`rayfin.serve`: the market pipeline.
- :mod:`rayfin.datasets`: the bundled real market data.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rayfin")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
