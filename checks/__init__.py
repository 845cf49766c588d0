"""Known-bug checks (installed as `llmdiff.checks`): one per file, registered by entry point
in pyproject.toml exactly as a third-party package registers its own. The contract is in
`llmdiff/check.py`.
"""
