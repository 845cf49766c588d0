"""Every module the package imports, at any depth (lazy imports inside functions too), comes
from a distribution pyproject.toml declares: a missing one fails here, not on a user's fresh
machine (protobuf and orbax-checkpoint once did)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGES = ("llmdiff", "references", "checks")
# Google DeepMind's gemma runs in a virtualenv of its own (`deepmind_gemma install`, pinned in
# constraints/deepmind.txt): these are imported by that adapter only, never in the core's.
# tokenizer_encoders.py uses DeepMind's tokenizer only where `gemma` is importable (that virtualenv).
OWN_VENV = {"references/deepmind_gemma.py": {"gemma", "flax"}, "llmdiff/tokenizer_encoders.py": {"gemma"},
            "references/llamacpp.py": {"llama_cpp"},  # llama-cpp-python: `llamacpp install`
            "references/keras_gemma.py": {"keras", "keras_hub"},  # `keras_gemma install`
            # run in the keras virtualenv; tensorflow(-text): `keras_gemma install --tensorflow-text`
            "references/keras_tokenizer_server.py": {"keras", "keras_hub", "tensorflow", "tensorflow_text"}}
# Imported only by the pytest plugin, which pytest itself loads.
PLUGIN_ONLY = {"llmdiff/pytest_plugin.py": {"pytest"}}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_name(r) for r in project["dependencies"]}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"llmdiff", "__future__"}


def test_every_imported_module_is_declared():
    declared = _declared()
    providers = metadata.packages_distributions()
    undeclared = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for module in sorted(_imports(path) - OWN_VENV.get(rel, set()) - PLUGIN_ONLY.get(rel, set())):
                dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
                if not dists & declared:
                    undeclared.append(f"{rel}: import {module} (from {', '.join(sorted(dists)) or 'nothing installed'})")
    assert undeclared == [], "imported but not declared in pyproject.toml dependencies:\n" + "\n".join(undeclared)


def test_the_check_itself_catches_an_undeclared_import(tmp_path):
    """The scan above must be able to fail: an import of a package nobody declared is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import hypothesis_not_declared\n    from yaml import safe_load\n")
    assert _imports(probe) == {"hypothesis_not_declared", "yaml"}
    assert "yaml" not in _declared() and "pyyaml" not in _declared()


def test_transformers_converts_sentencepiece_without_falling_back():
    """transformers needs protobuf (declared) to read a SentencePiece model into its fast
    tokenizer; without it it falls back to a tiktoken reader and tokenizer parity cannot run."""
    from transformers.utils import is_protobuf_available

    assert is_protobuf_available()
    assert "protobuf" in _declared()
