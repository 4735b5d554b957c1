"""Prefect flows. Importing any of them first applies the embedded defaults (lens/defaults.py),
so a flow started from Python, a deployment or the CLI sees the same local state."""

from lens import defaults

defaults.apply()
