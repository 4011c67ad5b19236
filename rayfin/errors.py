"""The exception hierarchy. Every error rayfin raises on purpose is a :class:`RayfinError`,
whose message says what went wrong and what to do; the CLI prints it without a traceback."""


class RayfinError(Exception):
    """Base class for errors with a message meant for the user."""


class ConfigError(RayfinError, ValueError):
    """The configuration is missing or invalid."""


class BrokerError(RayfinError):
    """The embedded Kafka broker could not be started, reached or stopped."""


class ModelAssetError(RayfinError):
    """A model could not be found, prepared or loaded."""


class DatasetError(RayfinError):
    """A bundled dataset is unknown or unreadable."""


class LLMError(RayfinError):
    """The distributed LLM could not serve a request."""


class UnsupportedModelError(LLMError, ValueError):
    """The model's architecture or an option for it is not supported."""


class SwarmUnavailableError(LLMError):
    """No chain of live, permitted servers covers every block of the model."""


class CacheFullError(LLMError):
    """A server's KV cache has no room for a new session."""


class SessionError(LLMError):
    """A session was used wrongly: closed, too long, or unknown to the server."""


class PromptTooLongError(SessionError):
    """A prompt has more tokens than the server takes, or than the model has positions for
    once the tokens to generate are added."""

    def __init__(self, tokens: int, limit: int, what: str = "prompt") -> None:
        super().__init__(
            f"the {what} is {tokens} tokens; the limit is {limit}: shorten it or ask for fewer "
            "new tokens"
        )
        self.tokens = tokens
        self.limit = limit
        self.what = what

    def __reduce__(self) -> tuple[type, tuple[int, int, str]]:
        return (type(self), (self.tokens, self.limit, self.what))


class SessionNotOpenError(SessionError):
    """A server does not hold the session (closed, expired, or the server restarted);
    the client can reopen it there and replay."""


class PointsError(LLMError, ValueError):
    """A points ledger input is invalid (an account, amount, work record or query), or its
    database cannot be used."""


class InsufficientPointsError(LLMError):
    """An account's balance is below the points a charge asks for; nothing was charged."""

    def __init__(self, account: str, balance: int, amount: int) -> None:
        super().__init__(
            f"account {account!r} has {balance} points, fewer than the {amount} asked; "
            "earn points by serving blocks, or get a grant (`rayfin llm points grant`)"
        )
        self.account = account
        self.balance = balance
        self.amount = amount

    def __reduce__(self) -> tuple[type, tuple[str, int, int]]:
        # Raised inside the points bank actor: Ray pickles it back to the caller.
        return (type(self), (self.account, self.balance, self.amount))


class AdapterNotCachedError(LLMError):
    """A request referred to adapter weights by digest that the server does not hold
    (evicted, or the server restarted); the client resends the weights."""


class AdapterHubError(LLMError):
    """The adapter hub could not be read or written, or an adapter to save is invalid."""


class AdapterNotFoundError(AdapterHubError, LookupError):
    """No saved adapter, version or alias of that name."""


class AdapterMismatchError(LLMError, ValueError):
    """An adapter was trained on another base model than the one it is loaded for."""


class InvalidMessage(RayfinError, ValueError):
    """A stream record failed validation. ``reason`` is one word from a fixed vocabulary
    (:data:`rayfin.stream.validation.REASONS`), ``detail`` says what exactly was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.reason, self.detail))


class TrainingError(RayfinError, ValueError):
    """A market model cannot be trained from the given data or settings."""


class ModelInputError(RayfinError, ValueError):
    """Feature rows lack what a market model needs to score them."""


class RegistryError(RayfinError):
    """The model registry could not be read or written."""


class ModelNotFoundError(RegistryError, LookupError):
    """No registered model, version or alias of that name."""


class RollbackError(RegistryError):
    """An alias has no earlier promotion to roll back to."""


class TradingError(RayfinError, ValueError):
    """A trading input is invalid: a signal, order, fill, instrument, or a ledger query or
    database the ledger cannot use."""


class ApiRequestError(RayfinError):
    """The rayfin HTTP API answered a request with an error (any non-2xx status).

    ``code`` is the server's stable error code (``forbidden``, ``rate_limited``,
    ``missing_features``...) to branch on, ``message`` its explanation and ``detail`` any
    structured detail (per-field problems for ``validation_error``). ``retry_after`` is the
    seconds the server asked to wait (429 and 503), else None.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: object = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[type, tuple[int, str, str, object, float | None]]:
        return (type(self), (self.status, self.code, self.message, self.detail, self.retry_after))


class ApiConnectionError(RayfinError, ConnectionError):
    """No HTTP answer came from the rayfin API (refused, reset or timed out), after the
    retries the request allowed."""
