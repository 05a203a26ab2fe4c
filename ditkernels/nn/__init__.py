"""Modules built on the ditkernels ops, mirroring the models they replace."""

from .dit import Attention, DiTBlock, FinalLayer, LabelEmbedder, Mlp, TimestepEmbedder

__all__ = ["Attention", "DiTBlock", "FinalLayer", "LabelEmbedder", "Mlp", "TimestepEmbedder"]
