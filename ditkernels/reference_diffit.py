"""The plain-PyTorch reference now at ditkernels.reference.diffit, importable here too."""

from .reference.diffit import *  # noqa: F401,F403
