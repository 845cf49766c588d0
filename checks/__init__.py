"""Known-bug checks (installed as `llmdiff.checks`), one per file, registered by entry point."""
