import pytest
import torch

from unet_core import UNet
from unet_core.model import valid_sizes


def _count_layers(model):
    convs = (torch.nn.Conv2d, torch.nn.Conv3d)
    upconvs = (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    return (sum(isinstance(m, convs) for m in model.modules()), sum(isinstance(m, upconvs) for m in model.modules()))


def test_paper_model_facts():
    model = UNet()
    assert _count_layers(model) == (19, 4)
    assert sum(p.numel() for p in model.parameters()) == 31_030_658
    assert model.output_shape((572, 572)) == (388, 388)
    assert model.input_shape_for((388, 388)) == (572, 572)


def test_3d_model_has_23_layers_and_valid_shapes():
    model = UNet(ndim=3, base_channels=4, depth=3)
    assert _count_layers(model) == (15, 3)
    paper3d = UNet(ndim=3, base_channels=2)
    assert _count_layers(paper3d) == (19, 4)
    out = model.output_shape((132, 132, 132))
    assert model.input_shape_for(out) == (132, 132, 132)
    x = torch.zeros(1, 1, *model.input_shape_for((4, 12, 4)))
    assert tuple(model(x).shape) == (1, 2, 4, 12, 4)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_output_and_input_shape_are_inverse(depth):
    model = UNet(base_channels=2, depth=depth)
    for out in valid_sizes(depth, kind="output", near=60, count=4):
        inp = model.input_shape_for((out, out))
        assert model.output_shape(inp) == (out, out)
        assert (inp[0] - out) // 2 == model.margin()


def test_forward_shape_matches_arithmetic():
    model = UNet(base_channels=4, depth=2, in_channels=3, n_classes=5)
    inp = model.input_shape_for((36, 44))
    y = model(torch.randn(2, 3, *inp))
    assert tuple(y.shape) == (2, 5, 36, 44)


def test_invalid_shape_names_nearest_valid_shapes():
    model = UNet()
    with pytest.raises(ValueError, match=r"input shape \(570, 572\).*nearest valid sizes.*\(556, 572\)"):
        model.output_shape((570, 572))
    with pytest.raises(ValueError, match="output shape"):
        model.input_shape_for((387, 388))
    with pytest.raises(ValueError, match="2D spatial shape"):
        model.output_shape((572, 572, 572))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="ndim must be 2 or 3"):
        UNet(ndim=4)
    with pytest.raises(ValueError, match="base_channels"):
        UNet(base_channels=0)
    with pytest.raises(ValueError, match="dropout"):
        UNet(dropout=1.5)


def test_he_initialisation():
    model = UNet(base_channels=64, depth=1)
    conv = model.down[0][2]  # second conv of level 1: 64 -> 64, 3x3
    expected = (2.0 / (64 * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0


def test_channels_last_and_autocast_give_same_result():
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2).eval()
    x = torch.randn(1, 1, *model.input_shape_for((20, 20)))
    with torch.inference_mode():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        fast = model_cl(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model_cl(x)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
    assert mixed.shape == reference.shape


def test_compile_where_available():
    model = UNet(base_channels=2, depth=1).eval()
    x = torch.randn(1, 1, *model.input_shape_for((12, 12)))
    try:
        compiled = torch.compile(model)
        out = compiled(x)
    except Exception as error:  # no compiler toolchain on this machine
        pytest.skip(f"torch.compile not available here: {error}")
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
