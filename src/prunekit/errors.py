"""Exception types of prunekit.

Every error subclasses the built-in type a user would catch for that mistake
(``ValueError``, ``TypeError``, ``KeyError``), so code written for
``torch.ao.pruning`` that catches those keeps working, and every message names the
fqn or key at fault, what was received and what was expected.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConfigKeyError",
    "ConfigTypeError",
    "FqnError",
    "PruneKitError",
    "StateDictError",
    "StateError",
    "UnsupportedError",
]


class PruneKitError(Exception):
    """Base class of every error prunekit raises on purpose."""


class ConfigError(PruneKitError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ConfigKeyError(PruneKitError, KeyError):
    """A required configuration key is missing (the reference raised a bare KeyError)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigTypeError(PruneKitError, TypeError):
    """A configuration value or argument has the wrong type."""


class FqnError(PruneKitError, KeyError):
    """A fully qualified name does not resolve inside the model."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable
        return str(self.args[0]) if self.args else ""


class StateError(PruneKitError, ValueError):
    """A call came at the wrong point of the life cycle (e.g. step after squash)."""


class StateDictError(PruneKitError, KeyError):
    """A state_dict does not fit the model or sparsifier it is loaded into."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedError(PruneKitError, NotImplementedError):
    """A feature or mode that prunekit does not implement (yet)."""
