"""WideResNet as used by FixMatch and DASO (Zagoruyko & Komodakis, BMVC 2016; Sohn et al., NeurIPS 2020).

WRN-d-k: a 3x3 stem conv to 16 channels; three groups of n = (d - 4) / 6 pre-activation basic blocks with
widths 16k, 32k, 64k and strides 1, 2, 2; a final BN + LeakyReLU + global average pool giving a 64k-d feature;
a linear classifier. WRN-28-2 (n = 4, widths 32 / 64 / 128, 128-d feature) has 1,467,610 parameters for 10
classes.

Pre-activation block (FixMatch's TensorFlow `residual` and the DASO reference):
    a = act(bn1(x)); out = conv2(act(bn2(conv1(a)))); out + shortcut(a if activate_before_residual else x)
`activate_before_residual` is set on the first block of the first group only, so the stem's raw output is
never added back un-normalised; elsewhere the shortcut carries the block input. (The popular FixMatch PyTorch
port instead feeds the un-activated x to conv1 in the first block of groups 2 and 3; this follows the TF
original.)
"""

from __future__ import annotations

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Pre-activation 3x3-3x3 block; 1x1 conv shortcut where the channels or the resolution change.

    Shape: (N, c_in, H, W) -> (N, c_out, H / stride, W / stride).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        bn_momentum: float,
        leaky_slope: float,
        activate_before_residual: bool = False,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, momentum=bn_momentum)
        self.act1 = nn.LeakyReLU(leaky_slope)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.act2 = nn.LeakyReLU(leaky_slope)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        reshape = stride != 1 or c_in != c_out
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if reshape else nn.Identity()
        # a construction-time constant, so forward has no data-dependent branch (torch.compile sees one graph)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: Tensor) -> Tensor:
        a = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(a))))
        return out + self.shortcut(a if self.activate_before_residual else x)


class WideResNet(nn.Module):
    """WRN-depth-widen with the model contract: `encode(x) -> (N, D)`, `classifier`, `feature_dim`.

    Shape: x (N, 3, H, W) -> logits (N, num_classes); encode(x) -> (N, 64 * widen).
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 28,
        widen: int = 2,
        bn_momentum: float = 0.001,
        leaky_slope: float = 0.1,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth={depth}: (depth - 4) must be divisible by 6, e.g. 10, 16, 22, 28")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = [
                BasicBlock(
                    widths[g] if i == 0 else widths[g + 1],
                    widths[g + 1],
                    stride if i == 0 else 1,
                    bn_momentum,
                    leaky_slope,
                    activate_before_residual=(g == 0 and i == 0),
                )
                for i in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(widths[3], momentum=bn_momentum)
        self.act = nn.LeakyReLU(leaky_slope)
        self.feature_dim = widths[3]
        self.classifier = nn.Linear(widths[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # the FixMatch reference's init: Kaiming-normal fan_out convs, BN (1, 0), Xavier-normal linear,
        # zero bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, x: Tensor) -> Tensor:
        out = self.groups(self.stem(x))  # (N, 64k, H/4, W/4)
        out = self.act(self.bn(out))
        return out.mean(dim=(2, 3))  # global average pool: (N, 64k)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.encode(x))
