"""The small error hierarchy shared by every layer of prism-agent."""

from __future__ import annotations


class PrismError(Exception):
    """Base of every error prism-agent raises on purpose.

    ``code`` is a stable, machine-readable name (it travels in MQTT error results);
    the message is one readable line.
    """

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The one-line human message."""
        return str(self)


class BadRequest(PrismError):
    """The caller asked for something that cannot be done (bad model, CR, shape...)."""

    code = "bad_request"


class ModelError(PrismError):
    """A model could not be found, loaded or recognised."""

    code = "model_error"


class GroupError(PrismError):
    """A distributed group failed: a peer died, a collective timed out, ranks disagree."""

    code = "group_error"
