"""Every named model configuration of every family, in one registry.

Each family (models/dit.py, uvit.py, diffit.py) keeps its constructor arguments by
name (DIT_CONFIGS, ...) and builds its dict of constructors (DiT_models, ...) with
register_configs, which also enters each name in MODELS; the constructors are bound
to module names too (DiT_XL_2, ...). Keyword arguments given to a constructor override the configuration's values,
in every family: DiT_models["DiT-S/2"](depth=2) is a two-block DiT-S/2, and
DiffiT_models["DiffiT-FFHQ64"](num_classes=3) a class-conditional one.
"""

from typing import Callable, Dict, Optional

import torch.nn as nn

# Name -> constructor, for every configuration of every family.
MODELS: Dict[str, Callable[..., nn.Module]] = {}


def config_constructor(name: str, cls, configs: dict, family: Optional[str] = None):
    """The constructor of configs[name], cls(**{**configs[name], **kwargs}), registered
    in MODELS under name.

    Its __name__ is the name as a Python identifier, with the family's spelling in
    names (family, e.g. "U-ViT") replaced by the class name: "U-ViT-S/2" -> UViT_S_2.
    """
    if name in MODELS:
        raise ValueError(f"model {name!r} is registered twice")

    def construct(**kwargs) -> nn.Module:
        return cls(**{**configs[name], **kwargs})

    ident = name.replace(family, cls.__name__) if family else name
    construct.__name__ = construct.__qualname__ = ident.replace("-", "_").replace("/", "_")
    construct.__doc__ = f"{name}: {cls.__name__}(**{configs[name]}), overridden by kwargs."
    MODELS[name] = construct
    return construct


def register_configs(cls, configs: dict, family: Optional[str] = None):
    """{name: config_constructor(name, cls, configs, family)} for every name in configs."""
    return {name: config_constructor(name, cls, configs, family) for name in configs}


def create_model(name: str, **kwargs) -> nn.Module:
    """MODELS[name](**kwargs), with a clear error for an unknown name."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; the registered ones are {sorted(MODELS)}")
    return MODELS[name](**kwargs)
