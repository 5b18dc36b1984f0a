"""One exception root. Each class's docstring is its default message; ``retriable`` says
whether the worker loop should back off and try the same batch again (infrastructure) or
whether the problem is permanent (configuration, bad input at the CLI)."""

from __future__ import annotations


class ChargelineError(Exception):
    """A chargeline operation failed."""

    retriable: bool = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class UsageError(ChargelineError):
    """The command line was not understood."""


class NotFoundError(ChargelineError):
    """The requested object does not exist."""


class ConfigurationError(ChargelineError):
    """The configuration is invalid."""


class InfrastructureError(ChargelineError):
    """A server chargeline depends on is unavailable; the operation will be retried."""

    retriable = True


class DatabaseUnavailable(InfrastructureError):
    """Postgres is unavailable."""


class BrokerUnavailable(InfrastructureError):
    """The Kafka broker is unavailable."""
