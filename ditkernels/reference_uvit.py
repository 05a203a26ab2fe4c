"""The plain-PyTorch reference now at ditkernels.reference.uvit, importable here too."""

from .reference.uvit import *  # noqa: F401,F403
