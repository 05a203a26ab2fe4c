"""Runnable end-to-end examples: ``python -m ditkernels.examples.<name> --help``."""
