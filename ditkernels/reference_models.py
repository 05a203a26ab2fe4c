"""The plain-PyTorch reference now at ditkernels.reference.dit, importable here too."""

from .reference.dit import *  # noqa: F401,F403
