"""Specification of the backbones (iResNet r18…r200, MobileFaceNet) and of their cost accounting.

Real compute only for r18 and mbf (small, CPU); the large models are built on the meta device, where
shapes, parameter counts and MAC counts are exact but nothing is allocated or computed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fr_train.backbones import BACKBONES, IBasicBlock, IResNet, MobileFaceNet, build_backbone
from fr_train.backbones.flops import count_flops, count_macs, count_parameters

ALL_NAMES = ["r18", "r34", "r50", "r100", "r200", "mbf"]
SMALL_NAMES = ["r18", "mbf"]


def _meta(name: str, **kw: object) -> nn.Module:
    with torch.device("meta"):
        return build_backbone(name, **kw)


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    """Random images in the training range [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 112, 112, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def small_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_backbone(name) for name in SMALL_NAMES}


# ------------------------------------------------------------------------------------------ registry


def test_registry_has_every_backbone_with_a_description() -> None:
    assert list(BACKBONES) == ALL_NAMES
    for name, spec in BACKBONES.items():
        assert spec.name == name
        assert spec.description.strip(), f"{name} needs a one-line description for `fr_train list`"
        assert "\n" not in spec.description


def test_unknown_backbone_name_error_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'r101'") as info:
        build_backbone("r101")
    for name in ALL_NAMES:
        assert name in str(info.value)


def test_unknown_builder_option_is_rejected_with_valid_options() -> None:
    with pytest.raises(ValueError, match=r"no option\(s\) \['fp16'\].*zero_init_residual"):
        build_backbone("r18", fp16=True)


def test_mbf_refuses_dropout_instead_of_ignoring_it() -> None:
    with pytest.raises(ValueError, match="'mbf' has no dropout"):
        _meta("mbf", dropout=0.2)


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_iresnet_rejects_invalid_dropout(dropout: float) -> None:
    with pytest.raises(ValueError, match="dropout must be in"):
        _meta("r18", dropout=dropout)


def test_iresnet_dropout_option_reaches_the_head() -> None:
    model = _meta("r18", dropout=0.4)
    assert isinstance(model, IResNet)
    assert model.dropout.p == 0.4


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_backbone_maps_112px_images_to_512d_embeddings(name: str) -> None:
    """Shape contract for all depths, checked on the meta device (no compute)."""
    model = _meta(name).eval()
    out = model(torch.empty(2, 3, 112, 112, device="meta"))
    assert out.shape == (2, 512)


@pytest.mark.parametrize("name", ["r50", "mbf"])
def test_embedding_size_is_configurable(name: str) -> None:
    model = _meta(name, embedding_size=128).eval()
    assert model(torch.empty(2, 3, 112, 112, device="meta")).shape == (2, 128)


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_wrong_input_size_is_rejected_with_a_clear_error(name: str) -> None:
    model = _meta(name)
    with pytest.raises(ValueError, match=r"N×3×112×112.*\(1, 3, 96, 96\)"):
        model(torch.empty(1, 3, 96, 96, device="meta"))


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_forward_and_backward_are_finite(name: str, small_models: dict[str, nn.Module]) -> None:
    model = small_models[name].train()
    model.zero_grad(set_to_none=True)
    out = model(_images(2))
    assert out.shape == (2, 512)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ BN behaviour


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_eval_mode_is_deterministic_and_independent_of_the_batch(
    name: str, small_models: dict[str, nn.Module]
) -> None:
    model = small_models[name].eval()
    x = _images(3, seed=1)
    with torch.no_grad():
        a, b = model(x), model(x)
        single = model(x[:1])
    assert torch.equal(a, b)
    # The untrained network's outputs reach ~1e7 here, and oneDNN may choose other convolution kernels
    # for 1 image than for 3 (another summation order): fp32 rounding then moves an element by ~4e-7
    # of the output's scale (seen on an AVX2-only AMD EPYC), while batch statistics leaking into eval
    # mode would move it by the scale itself. So the tolerance is relative to that scale.
    torch.testing.assert_close(single, a[:1], rtol=1e-4, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_train_mode_normalises_with_batch_statistics_and_updates_running_stats(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name).train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    x = _images(4, seed=2)
    with torch.no_grad():
        together = model(x)[:2]
        alone = model(x[:2])  # different batch → different statistics → different output
    assert not torch.allclose(together, alone, atol=1e-3)
    assert not torch.equal(bn.running_mean, before)
    assert int(bn.num_batches_tracked) == 2


# ------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_channels_last_gives_the_same_embeddings_as_contiguous(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    x = _images(2, seed=3)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        got = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# ------------------------------------------------------------------------------------------ init / layout


def test_iresnet_final_bn_scale_is_frozen_at_one() -> None:
    """As insightface: the embedding BN1d only shifts; its scale stays 1 through training."""
    torch.manual_seed(0)
    model = build_backbone("r18").train()
    assert isinstance(model, IResNet)
    assert not model.features.weight.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(_images(2)).sum().backward()
    opt.step()
    assert model.features.weight.grad is None
    assert torch.equal(model.features.weight, torch.ones(512))
    assert count_parameters(model) - count_parameters(model, trainable_only=True) == 512


def test_iresnet_initialisation_follows_insightface() -> None:
    torch.manual_seed(0)
    model = build_backbone("r18")
    big_conv = model.layer4[1].conv1.weight  # 512×512×3×3 = 2.4M samples
    assert abs(big_conv.mean().item()) < 1e-3
    assert big_conv.std().item() == pytest.approx(0.1, rel=0.01)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_zero_init_residual_starts_every_block_as_identity() -> None:
    torch.manual_seed(0)
    model = build_backbone("r18", zero_init_residual=True).eval()
    block = model.layer2[1]
    assert isinstance(block, IBasicBlock) and block.downsample is None
    x = torch.randn(2, 128, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)
    # …and it is off by default.
    plain = build_backbone("r18").eval()
    with torch.no_grad():
        assert not torch.allclose(plain.layer2[1](x), x)


def test_iresnet_state_dict_names_match_insightface_checkpoints() -> None:
    """insightface `backbone.pth` files must load with strict=True, so the key layout is a contract."""
    state = _meta("r50").state_dict()
    keys = set(state)
    for key in [
        "conv1.weight", "bn1.running_var", "prelu.weight",
        "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.bias", "layer1.0.prelu.weight",
        "layer1.0.conv2.weight", "layer1.0.bn3.num_batches_tracked",
        "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean",
        "layer3.13.conv2.weight", "bn2.weight", "fc.weight", "fc.bias",
        "features.weight", "features.bias", "features.running_mean",
    ]:  # fmt: skip
        assert key in keys, key
    assert "layer1.1.downsample.0.weight" not in keys  # only the first block of a stage projects
    assert "layer3.14.conv1.weight" not in keys  # r50 has 14 blocks in stage 3
    assert tuple(state["fc.weight"].shape) == (512, 512 * 7 * 7)


def test_mbf_state_dict_names_match_insightface_checkpoints() -> None:
    model = _meta("mbf")
    assert isinstance(model, MobileFaceNet)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "layers.0.layers.0.weight": (128, 3, 3, 3),  # stem conv, 2× width
        "layers.1.layers.0.weight": (128, 2, 3, 3),  # grouped 3×3, 64 groups of 2 channels
        "layers.2.layers.0.layers.0.weight": (128, 128, 1, 1),  # first downsampling unit: expand
        "layers.2.layers.1.layers.0.weight": (128, 1, 3, 3),  # depthwise
        "layers.3.layers.3.layers.2.layers.0.weight": (128, 128, 1, 1),  # 4th residual unit, projection
        "layers.4.layers.0.layers.0.weight": (256, 128, 1, 1),
        "layers.6.layers.0.layers.0.weight": (512, 256, 1, 1),  # expansion 512 before the last stride
        "layers.7.layers.1.layers.2.layers.1.running_var": (256,),
        "conv_sep.layers.0.weight": (512, 256, 1, 1),
        "features.layers.0.layers.0.weight": (512, 1, 7, 7),  # GDC
        "features.layers.2.weight": (512, 512),  # FC without bias
        "features.layers.3.weight": (512,),  # BN1d (trainable here, unlike iResNet)
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert "features.layers.2.bias" not in shapes
    assert "layers.5.layers.5.layers.0.layers.0.weight" in shapes  # 6 units in stage 3
    assert "layers.5.layers.6.layers.0.layers.0.weight" not in shapes


# ------------------------------------------------------------------------------------------ cost


def test_mac_count_of_single_layers_matches_the_formula() -> None:
    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2, bias=False)
    # output 1×6×4×4 = 96 elements, each a dot product over (4/2)·3·3 = 18 inputs
    assert count_macs(conv, (1, 4, 8, 8)) == 96 * 18
    linear = nn.Linear(10, 5)
    assert count_macs(linear, (3, 10)) == 3 * 5 * 10
    assert count_flops(linear, (3, 10)) == 2 * 150
    bn = nn.Sequential(nn.BatchNorm2d(4), nn.PReLU(4))
    assert count_macs(bn, (2, 4, 3, 3)) == 0
    assert count_macs(bn, (2, 4, 3, 3), include_elementwise=True) == 2 * 72


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_flop_count_agrees_with_torch_flop_counter(name: str) -> None:
    """Independent check: torch's FlopCounterMode counts 2 FLOPs per conv/matmul MAC."""
    model = _meta(name).eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 112, 112, device="meta"))
    assert count_flops(model) == counter.get_total_flops()


def test_count_macs_restores_the_train_eval_flags() -> None:
    model = _meta("mbf").train()
    model.features.layers[3].eval()
    count_macs(model)
    assert model.training and not model.features.layers[3].training


# Published figures on a 112×112 input. MACs: insightface arcface_torch README ("FLOPs" column of its ViT
# table, computed with ptflops = MACs): r18 2.6, r50 6.3, r100 12.1, r200 23.5; "mobilefacenet-0.45G".
# FLOPs (= 2×MACs) and params: OpenVINO model cards of insightface's MXNet LResNet{34,50,100}E-IR.
PUBLISHED = {
    # name: (GMACs or None, GFLOPs or None, Mparams or None, relative tolerance)
    "r18": (2.6, None, None, 0.02),
    "r34": (None, 8.934, 34.129, 0.005),
    "r50": (6.3, 12.637, 43.576, 0.005),
    "r100": (12.1, 24.2115, 65.132, 0.005),
    "r200": (23.5, None, None, 0.005),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_iresnet_cost_matches_published_figures(name: str) -> None:
    gmacs, gflops, mparams, rel = PUBLISHED[name]
    model = _meta(name)
    macs = count_macs(model)
    if gmacs is not None:
        assert macs / 1e9 == pytest.approx(gmacs, rel=max(rel, 0.05 / gmacs))  # README rounds to 0.1
    if gflops is not None:
        assert count_flops(model) / 1e9 == pytest.approx(gflops, rel=rel)
    if mparams is not None:
        assert count_parameters(model) / 1e6 == pytest.approx(mparams, rel=rel)


def test_mbf_cost_matches_insightface_045g() -> None:
    """insightface's 0.45G is a ptflops MAC count, which includes BN/PReLU elementwise ops."""
    model = _meta("mbf")
    assert count_macs(model, include_elementwise=True) / 1e9 == pytest.approx(0.45, rel=0.02)
    assert count_macs(model) / 1e9 == pytest.approx(0.4375, rel=0.001)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_registry_cost_table_matches_measurement(name: str) -> None:
    spec = BACKBONES[name]
    model = _meta(name)
    assert count_macs(model) / 1e9 == pytest.approx(spec.gmacs, rel=0.002)
    assert count_parameters(model) / 1e6 == pytest.approx(spec.mparams, rel=0.002)


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_smaller_square_inputs_size_the_head_and_are_enforced(name: str) -> None:
    """image_size=64 (CPU demos) sizes the FC/GDC head for a 4×4 map; other sizes are refused."""
    model = build_backbone(name, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    with pytest.raises(ValueError, match="expects N×3×64×64"):
        model(torch.randn(1, 3, 112, 112))
    with pytest.raises(ValueError, match="image_size must be a multiple of 16"):
        build_backbone(name, image_size=100)
