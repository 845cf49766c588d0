"""Implementations by name, interpreter and virtualenv; a worker's failures, said once."""

from __future__ import annotations

import os
import sys

import pytest

from llmdiff.errors import UsageError
from llmdiff.runner import Implementation, venv_python


def test_registered_names_and_adapters():
    hf = Implementation.parse("hf")
    assert (hf.module, hf.cls) == ("llmdiff.references.hf", "HFReference")
    assert hf.adapter_class().makes_weights and hf.adapter_class().has_bare_forward
    mine = Implementation.parse(f"pkg.mod:Adapter@{sys.executable}")
    assert (mine.name, mine.module, mine.cls, mine.python) == ("pkg.mod:Adapter", "pkg.mod", "Adapter", sys.executable)


def test_unknown_name_and_bad_interpreter_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no implementation 'nope'; available: .*deepmind, hf, keras, llamacpp, oracle"):
        Implementation.parse("nope")
    with pytest.raises(UsageError, match="is not an executable Python interpreter"):
        Implementation.parse(f"hf@{tmp_path / 'python'}")


def test_an_implementation_with_its_own_virtualenv_runs_there(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMDIFF_VENVS", str(tmp_path))
    assert venv_python("hf") is None and Implementation.parse("hf").python == sys.executable
    exe = tmp_path / "hf" / "bin" / "python"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    os.chmod(exe, 0o755)
    assert venv_python("hf") == str(exe) and Implementation.parse("hf").python == str(exe)


def test_an_adapter_this_interpreter_cannot_import_is_taken_not_to_make_weights():
    from llmdiff.api import _makes_weights

    assert _makes_weights(Implementation.parse("oracle"))
    assert not _makes_weights(Implementation(name="elsewhere:Adapter", module="no_such_module_here", cls="Adapter"))
