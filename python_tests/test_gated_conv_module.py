import pytest
import torch
import torch.nn as nn
import torchvision

from tlkernels.nn import GatedConv2d, convert_conv2d
from tlkernels.ops import gated_conv2d_reference


def test_from_conv_copies_without_sharing_storage():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True)
    g = GatedConv2d.from_conv(conv)
    assert g.weight.data_ptr() != conv.weight.data_ptr() and g.weight_pre.data_ptr() != g.weight.data_ptr()
    assert g.bias_pre.data_ptr() != g.bias.data_ptr()
    x = torch.randn(2, 3, 9, 9)
    for gate in (torch.zeros(2), torch.ones(2, 8), torch.rand(2, 8)):
        torch.testing.assert_close(g(x, gate), conv(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        g.weight.add_(1.0)
    torch.testing.assert_close(conv.weight, g.weight_pre)  # the pre-trained copy did not move
    assert not g.weight_pre.requires_grad and g.weight.requires_grad
    assert [n for n, _ in g.named_parameters()] == ["weight", "bias"]


def test_forward_matches_reference_and_reflect_padding():
    g = GatedConv2d(4, 6, 3, padding=1, padding_mode="reflect")
    with torch.no_grad():
        g.weight.normal_()
    x, gate = torch.randn(2, 4, 7, 7), torch.rand(2, 6)
    xp = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    ref = gated_conv2d_reference(xp, g.weight_pre, g.weight, gate, g.bias_pre, g.bias)
    torch.testing.assert_close(g(x, gate), ref)


def test_gate_provider_and_missing_gate_error():
    g = GatedConv2d(3, 4, 1)
    x = torch.randn(5, 3, 4, 4)
    with pytest.raises(RuntimeError, match="GatedConv2d: no gate given and no gate provider set"):
        g(x)
    g.set_gate_provider(lambda inp: torch.ones(inp.shape[0]))
    torch.testing.assert_close(g(x), nn.functional.conv2d(x, g.weight, g.bias))
    with pytest.raises(TypeError, match="provider must be callable"):
        g.set_gate_provider(3)


def test_state_dict_round_trip_and_repr():
    g = GatedConv2d(3, 4, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        g.weight.normal_()
    sd = g.state_dict()
    assert set(sd) == {"weight", "weight_pre"}
    h = GatedConv2d(3, 4, 3, stride=2, padding=1, bias=False)
    h.load_state_dict(sd)
    x, gate = torch.randn(2, 3, 8, 8), torch.rand(2, 4)
    torch.testing.assert_close(h(x, gate), g(x, gate))
    conv_repr = repr(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False))
    assert repr(g) == conv_repr.replace("Conv2d", "GatedConv2d")


def test_convert_conv2d_on_resnet():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    out = convert_conv2d(model, predicate=lambda name, m: name != "conv1")
    assert out is model
    assert type(model.conv1) is nn.Conv2d and isinstance(model.layer1[0].conv1, GatedConv2d)
    n = sum(isinstance(m, GatedConv2d) for m in model.modules())
    assert n == 19  # 16 block convs + 3 downsample convs
    for m in model.modules():
        if isinstance(m, GatedConv2d):
            m.set_gate_provider(lambda inp: torch.zeros(inp.shape[0], dtype=inp.dtype))
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    single = convert_conv2d(nn.Conv2d(3, 3, 1))
    assert isinstance(single, GatedConv2d)
    with pytest.raises(TypeError, match="convert_conv2d: predicate must be callable"):
        convert_conv2d(model, predicate="layer1")
