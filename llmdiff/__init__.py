"""llmdiff: find bugs in LLM implementations by comparing them layer by layer.

Importing llmdiff imports no framework (torch, jax) and no terminal library.
"""

__version__ = "0.1.0"


def compare(*args, **kwargs):
    """See `llmdiff.api.compare`."""
    from llmdiff.api import compare as _compare

    return _compare(*args, **kwargs)


__all__ = ["compare", "__version__"]
