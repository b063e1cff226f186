"""Engine errors beyond the protocol's `EngineError` (kept apart so commands can map each to an exit code)."""

from __future__ import annotations

from densify.engines.base import EngineError

__all__ = ["EngineError", "EngineStartError"]


class EngineStartError(EngineError):
    """The engine could not start: an unreachable server, a refused API key, a model the server does not
    serve. The message names the fix. Nothing was asked yet, so a command stops at once."""
