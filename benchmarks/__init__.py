"""The benchmark scripts, importable as a package (``from benchmarks import harness``) by the scripts and tests.

Every script still runs as ``python benchmarks/<script>.py ...`` (the command lines in their docstrings).
"""
