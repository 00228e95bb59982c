"""torchvision ResNet-18/34/50 (He et al., CVPR 2016) under the model contract, for larger images (Semi-Aves).

The torchvision network keeps its stem, stages and global average pool; its `fc` becomes an identity so the
backbone returns the pooled feature, and a fresh `classifier` maps it to the classes. BatchNorm keeps
torchvision's momentum (0.1): the WRN-specific `bn_momentum` / `leaky_slope` settings do not apply here.
"""

from __future__ import annotations

from typing import Literal
from urllib.error import URLError

import torchvision
from torch import Tensor, hub, nn

ResNetName = Literal["resnet18", "resnet34", "resnet50"]


def imagenet_state_dict(arch: ResNetName) -> dict[str, Tensor]:
    """torchvision's ImageNet weights (IMAGENET1K_V1) for `arch`, from the torch hub cache or downloaded.

    Raises RuntimeError saying what failed and how to proceed when the file is neither cached nor reachable.
    """
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    try:
        return hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except (URLError, OSError) as err:
        raise RuntimeError(
            f"model.pretrained=true: could not load the torchvision ImageNet weights of {arch} from "
            f"{weights.url} ({err}). It needs network access or the file in {hub.get_dir()}/checkpoints; "
            "otherwise set model.pretrained=false."
        ) from err


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet with `encode(x) -> (N, D)`, `classifier` and `feature_dim` (512, or 2048 for 50).

    Shape: x (N, 3, H, W) -> logits (N, num_classes); encode(x) -> (N, D).
    """

    def __init__(self, arch: ResNetName, num_classes: int, pretrained: bool = False) -> None:
        super().__init__()
        backbone = torchvision.models.get_model(arch, weights=None)
        if pretrained:
            backbone.load_state_dict(imagenet_state_dict(arch))
        self.feature_dim = backbone.fc.in_features
        backbone.fc = nn.Identity()  # the backbone now ends at the pooled, flattened feature
        self.backbone = backbone
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def encode(self, x: Tensor) -> Tensor:
        return self.backbone(x)  # (N, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.encode(x))
