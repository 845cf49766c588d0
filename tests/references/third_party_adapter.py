"""A third-party adapter written from docs/design.md and references/base.py alone: it wraps
llmdiff's oracle the way an adapter wraps any framework (build in `load`, forward in `run`)."""

from __future__ import annotations

from llmdiff.references.base import Reference
from llmdiff.references.oracle import OracleReference


class WrappedOracle(Reference):
    name = "wrapped-oracle"

    def __init__(self, job):
        super().__init__(job)
        self.inner = OracleReference(job)

    def versions(self):
        return {"wrapped-oracle": "1.0", **self.inner.versions()}

    def load(self, request):
        self.inner.begin(request)
        self.inner.load(request)

    def run(self, tokens):
        return self.inner.run(tokens)

    def describe(self):
        return {"wraps": "oracle"}
