"""Backbones: the model contract for every registered arch, and the WRN's architecture details."""

from __future__ import annotations

import math
import typing
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import hub, nn

from trainables.config import ArchName, ModelConfig
from trainables.models import MODELS, build_model
from trainables.models.resnet import TorchvisionResNet
from trainables.models.wrn import BasicBlock, WideResNet


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CI shares two cores between workers
    yield
    torch.set_num_threads(threads)


def test_registry_covers_the_config_literal():
    assert set(MODELS) == set(typing.get_args(ArchName))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_model_contract(arch):
    """encode -> (N, D); classifier = Linear(D, C); model(x) == classifier(encode(x)); grads flow."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, pretrained=False), num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    feat = model.encode(x)
    assert feat.shape == (2, model.feature_dim)
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (model.feature_dim, 7)
    logits = model(x)
    assert logits.shape == (2, 7)
    model.eval()
    torch.testing.assert_close(model(x), model.classifier(model.encode(x)))
    model.train()
    model(x).sum().backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


def _wrn_param_count(depth: int, widen: int, num_classes: int) -> int:
    """Closed form: stem 3*16*9; per block BN(c_in) 2c_in + conv 9 c_in c_out + BN(c_out) 2c_out
    + conv 9 c_out^2 (+ 1x1 shortcut c_in c_out in the first block of each group, where the width changes);
    final BN 2*64k; classifier 64k*C + C.
    WRN-28-2, C=10: 432 + 70,112 + 279,488 + 1,116,032 + 256 + 1,290 = 1,467,610."""
    n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
    total = 3 * 16 * 9
    for g in range(3):
        for i in range(n):
            c_in, c_out = (widths[g] if i == 0 else widths[g + 1]), widths[g + 1]
            total += 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out
            total += c_in * c_out if i == 0 else 0
    return total + 2 * widths[3] + widths[3] * num_classes + num_classes


def test_wrn_28_2_parameter_count():
    model = WideResNet(num_classes=10, depth=28, widen=2)
    count = sum(p.numel() for p in model.parameters())
    assert _wrn_param_count(28, 2, 10) == 1_467_610
    assert count == 1_467_610
    assert abs(count - 1.47e6) / 1.47e6 < 0.01  # the papers' "1.47M"


def test_wrn_shapes_widths_and_strides():
    """WRN-28-2 on 32 px: groups of 4 blocks, output (N, 128, 8, 8) after strides 1/2/2, 128-d feature."""
    model = WideResNet(num_classes=10)
    assert [len(g) for g in model.groups] == [4, 4, 4]
    assert model.feature_dim == 128
    with torch.no_grad():
        assert model.groups(model.stem(torch.randn(1, 3, 32, 32))).shape == (1, 128, 8, 8)
    wide = build_model(ModelConfig(arch="wrn", depth=16, widen=4), num_classes=3)
    assert [len(g) for g in wide.groups] == [2, 2, 2] and wide.feature_dim == 256


def test_wrn_hyperparameters_and_init():
    """BN momentum and LeakyReLU slope from the config; BN (1, 0); classifier bias 0; Kaiming fan_out convs:
    a 128 -> 128 3x3 conv has fan_out 128 * 9 = 1152, std sqrt(2 / 1152) = 0.0417 (gain sqrt(2), slope 0)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="wrn", bn_momentum=0.001, leaky_slope=0.1), num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.momentum == 0.001 for bn in bns)
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.1 for a in acts)
    assert torch.all(model.classifier.bias == 0)
    conv = model.groups[2][1].conv2
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 1152), rel=0.02)


@pytest.mark.parametrize("activate_before_residual", [True, False])
def test_block_pre_activation_and_shortcut_input(activate_before_residual):
    """a = act1(bn1(x)); out = conv2(act2(bn2(conv1(a)))) + shortcut(a if activate_before_residual else x).
    The shortcut input differs between the two settings, so the sums differ too."""
    torch.manual_seed(0)
    block = BasicBlock(2, 4, 2, 0.1, 0.1, activate_before_residual).eval()
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        x = torch.randn(3, 2, 6, 6)
        a = block.act1(block.bn1(x))
        residual = block.conv2(block.act2(block.bn2(block.conv1(a))))
        expected = residual + block.shortcut(a if activate_before_residual else x)
        other = residual + block.shortcut(x if activate_before_residual else a)
        out = block(x)
    assert out.shape == (3, 4, 3, 3)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, other)


def test_only_the_first_block_activates_before_residual():
    model = WideResNet(num_classes=10)
    flags = [[b.activate_before_residual for b in g] for g in model.groups]
    assert flags == [[True, False, False, False], [False] * 4, [False] * 4]
    assert isinstance(model.groups[0][1].shortcut, nn.Identity)
    assert isinstance(model.groups[1][0].shortcut, nn.Conv2d)


def test_wrn_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = WideResNet(num_classes=5, depth=10, widen=1).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_wrn_compiles_as_one_graph():
    """fullgraph=True fails on any graph break (Python-side data-dependent control flow)."""
    torch.manual_seed(0)
    model = WideResNet(num_classes=5, depth=10, widen=1).eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_pretrained_unreachable_fails_with_a_clear_message(monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"resnet18.*model\.pretrained=false"):
        build_model(ModelConfig(arch="resnet18", pretrained=True), num_classes=10)


def test_pretrained_loads_the_torchvision_weights(monkeypatch):
    """The backbone takes the downloaded ImageNet state dict; the classifier is new (num_classes outputs)."""
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(weights=None).state_dict()
    seen = []

    def cached(url, **kwargs):
        seen.append(url)
        return imagenet

    monkeypatch.setattr(hub, "load_state_dict_from_url", cached)
    torch.manual_seed(2)
    model = TorchvisionResNet("resnet18", num_classes=10, pretrained=True)
    assert seen == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    torch.testing.assert_close(model.backbone.conv1.weight, imagenet["conv1.weight"])
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, imagenet["layer4.1.bn2.running_var"])
    assert model.classifier.out_features == 10
