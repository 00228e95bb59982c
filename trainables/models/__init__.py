"""Backbones by name: `MODELS[arch](cfg, num_classes)`, keys = the `ArchName` literal of the run config.

Every model obeys one contract, which the training loop relies on:
    model.encode(x) -> (N, D) features after the final BN / activation and global average pool
    model.classifier: nn.Linear(D, num_classes);  model(x) == model.classifier(model.encode(x))
    model.feature_dim == D
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from trainables.config import ArchName, ModelConfig
from trainables.models.resnet import TorchvisionResNet
from trainables.models.wrn import WideResNet


def build_wrn(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return WideResNet(num_classes, cfg.depth, cfg.widen, cfg.bn_momentum, cfg.leaky_slope)


def build_resnet18(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return TorchvisionResNet("resnet18", num_classes, cfg.pretrained)


def build_resnet34(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return TorchvisionResNet("resnet34", num_classes, cfg.pretrained)


def build_resnet50(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return TorchvisionResNet("resnet50", num_classes, cfg.pretrained)


MODELS: dict[ArchName, Callable[[ModelConfig, int], nn.Module]] = {
    "wrn": build_wrn,
    "resnet18": build_resnet18,
    "resnet34": build_resnet34,
    "resnet50": build_resnet50,
}


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The backbone `cfg.arch` with a `num_classes`-way classifier."""
    if cfg.arch not in MODELS:
        raise ValueError(f"model.arch={cfg.arch!r} is not registered; valid: {', '.join(MODELS)}")
    return MODELS[cfg.arch](cfg, num_classes)
