"""Prefect flows. Importing any of them first applies the embedded defaults
(lens_model/defaults.py), so a flow started from Python, a deployment or the CLI sees the same
local state."""

from lens_model import defaults

defaults.apply()
