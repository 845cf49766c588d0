"""[tool.llmdiff] / llmdiff.toml: defaults, and one line for every bad value."""

from __future__ import annotations

import os

import pytest

from llmdiff.config import find_config
from llmdiff.errors import UsageError


def test_llmdiff_toml_wins_over_pyproject(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.llmdiff]\nseed = 1\n')
    (tmp_path / "llmdiff.toml").write_text('seed = 2\n[thresholds]\n"L*.q" = 16\n')
    config, path = find_config(tmp_path)
    assert config == {"seed": 2, "thresholds": {"L*.q": 16}} and path.name == "llmdiff.toml"


def test_no_configuration(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert find_config(tmp_path) == ({}, None)


@pytest.mark.parametrize("text,said", [
    ("colour = 1", "unknown key 'colour'"),
    ("seed = true", "seed must be int"),
    ("dtypes = []", "dtypes must be a non-empty list"),
    ("implementations = [1]", "implementations must be a non-empty list of names"),
    ("timeout = 0", "timeout must be a positive number"),
    ("floor_factor = -2", "floor_factor must be a positive number"),
    ('[thresholds]\n"L*" = 0', "thresholds.'L*' must be a positive number"),
    ("seed = [", "not valid TOML"),
])
def test_bad_configuration_is_one_line(tmp_path, text, said):
    (tmp_path / "llmdiff.toml").write_text(text + "\n")
    with pytest.raises(UsageError, match=r".*") as e:
        find_config(tmp_path)
    assert said in str(e.value) and "\n" not in str(e.value)


def test_a_configuration_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "llmdiff.toml")
    with pytest.raises(UsageError, match="is a FIFO"):
        find_config(tmp_path)
