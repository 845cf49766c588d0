"""Implementations llmdiff compares (installed as `llmdiff.references`).

Built-in adapters register through the entry-point group `llmdiff.references`, the same way a
third-party package adds one. Importing this package imports no framework.
"""
