"""pytest plugin (registered through the `pytest11` entry point when llmdiff is installed).

In a porter's own test suite:

    import llmdiff

    def test_my_port_matches():
        assert llmdiff.compare("gemma-7b", impls=["my_port:Adapter"], tiny=True)

A failing assert prints the verdict of every run and every finding. The `llmdiff_compare`
fixture does the same and also writes the reports next to the test's tmp_path.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def llmdiff_compare(tmp_path):
    """`llmdiff_compare(model, **compare_kwargs)`: compare, write reports to tmp_path, return the result."""
    from llmdiff.api import compare
    from llmdiff.report import write_outputs

    def run(model, **kwargs):
        result = compare(model, **kwargs)
        write_outputs(result.report, tmp_path / "llmdiff")
        return result

    return run
