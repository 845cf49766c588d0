"""Errors a user can act on. The CLI prints their message on one line and exits 2."""


class LLMDiffError(Exception):
    """Base class: the message says what failed, what was expected and what to do."""


class UsageError(LLMDiffError):
    """Bad command-line input: unknown model, implementation, dtype, option."""


class WeightsError(LLMDiffError):
    """Missing, corrupt, truncated or mis-shaped weights."""
