"""Modules built on the ditkernels ops, mirroring the models they replace.

functional.py   the fused LayerNorm wrappers, the long-skip merge, argument checks
embed.py        timestep and label embedders, patch embedding, position tables
dit.py          DiT's Attention, Mlp, DiTBlock, FinalLayer
uvit.py         U-ViT's Attention, Mlp, Block, PatchEmbed
tmsa.py         DiffiT's time-dependent attention TMSA
diffit.py       DiffiTBlock, DiffiTFinalLayer, DiffiTResBlock
"""

from . import diffit, dit, embed, functional, tmsa, uvit
from .diffit import DiffiTBlock, DiffiTFinalLayer, DiffiTResBlock
from .dit import Attention, DiTBlock, FinalLayer, Mlp
from .embed import LabelEmbedder, PatchEmbed, TimestepEmbedder
from .tmsa import TMSA

__all__ = ["Attention", "DiTBlock", "DiffiTBlock", "DiffiTFinalLayer", "DiffiTResBlock",
           "FinalLayer", "LabelEmbedder", "Mlp", "PatchEmbed", "TMSA", "TimestepEmbedder",
           "diffit", "dit", "embed", "functional", "tmsa", "uvit"]
