"""Models: output shapes, parameter counts against the references, input-shape checks, model YAMLs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from sam_runner import models
from sam_runner.errors import ConfigError

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
IMAGE, SEQUENCE = (3, 32, 32), (1, 40)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Parameter counts for 10 classes. References: ResNet-18 11.2M (REFERENCE §7), WRN-16-8 ~11.0M and WRN-28-10
# ~36.5M (Zagoruyko & Komodakis), the MNIST-1D CNN's 125-feature linear head (Greydanus), C1's 1,757,834 (REFERENCE §4).
@pytest.mark.parametrize("builder, shape, options, params", [
    (models.resnet18, IMAGE, {}, 11_173_962),
    (models.wide_resnet, IMAGE, {"depth": 16, "widen_factor": 8}, 10_961_370),
    (models.keskar_c1, IMAGE, {}, 1_757_834),
    (models.cnn1d, SEQUENCE, {}, 5_210),
    (models.cnn1d, SEQUENCE, {"norm": "batch"}, 5_210 - 3 * 25 + 3 * 2 * 25),  # conv biases become BN's γ, β
    (models.mlp, SEQUENCE, {}, 15_210),
    (models.mlp, (1, 28, 28), {"hidden": [512] * 5}, 784 * 512 + 4 * 512 * 512 + 512 * 10 + 5 * 512 + 10),
], ids=["resnet18", "wrn16_8", "keskar_c1", "cnn1d", "cnn1d_batchnorm", "mlp", "mlp_f1"])
def test_builder_maps_inputs_to_logits(builder, shape, options, params):
    model = builder(num_classes=10, input_shape=shape, **options)
    assert count(model) == params
    logits = model(torch.randn(2, *shape))
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_wrn28_10_parameter_count():
    model = models.wide_resnet(num_classes=10, input_shape=IMAGE, depth=28, widen_factor=10)
    assert count(model) == 36_479_194


def test_num_classes_and_channels_follow_the_arguments():
    model = models.wide_resnet(num_classes=100, input_shape=(1, 16, 16), depth=10, widen_factor=1, dropout=0.3)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 100)
    assert models.cnn1d(num_classes=3, input_shape=(2, 64))(torch.randn(2, 2, 64)).shape == (2, 3)


def test_cnn1d_with_batch_norm_normalizes_after_each_convolution():
    model = models.cnn1d(num_classes=10, input_shape=SEQUENCE, norm="batch")
    layers = [m for m in model.modules() if not isinstance(m, nn.Sequential)]
    block = [nn.Conv1d, nn.BatchNorm1d, nn.ReLU]
    assert [type(m) for m in layers] == 3 * block + [nn.Flatten, nn.Linear]
    assert all(m.bias is None for m in layers if isinstance(m, nn.Conv1d))


def test_keskar_c1_has_the_layers_of_keskars_shallownet_in_order():
    """network_zoo.shallownet: 2 x [conv 5x5-64 'same', BN, ReLU, max-pool 3x3/2 'same'], flatten,
    2 x [Dense, BN, ReLU, Dropout 0.5] with 384 and 192 units, Dense 10."""
    model = models.keskar_c1(num_classes=10, input_shape=IMAGE)
    layers = [m for m in model.modules() if not isinstance(m, nn.Sequential)]
    conv_block = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, models.small.SameMaxPool2d]
    dense_block = [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert [type(m) for m in layers] == 2 * conv_block + [nn.Flatten] + 2 * dense_block + [nn.Linear]
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert all(c.kernel_size == (5, 5) and c.out_channels == 64 and c.padding == (2, 2) for c in convs)
    assert all((p.kernel_size, p.stride) == (3, 2) for p in layers if isinstance(p, models.small.SameMaxPool2d))
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64 * 8 * 8, 384), (384, 192), (192, 10)]
    assert all(m.p == 0.5 for m in layers if isinstance(m, nn.Dropout))


def keras_same_max_pool(image: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Keras 'same' max-pooling written out: out = ceil(n / s), windows start at i*s - pad_before with
    pad_before = floor(total / 2) (the odd padding pixel goes after), clipped to the image."""
    def starts(size: int) -> list[int]:
        out = -(-size // stride)
        before = max((out - 1) * stride + kernel - size, 0) // 2
        return [i * stride - before for i in range(out)]

    rows, cols = starts(image.shape[-2]), starts(image.shape[-1])
    result = torch.empty(*image.shape[:-2], len(rows), len(cols))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            window = image[..., max(r, 0):r + kernel, max(c, 0):c + kernel]
            result[..., i, j] = window.amax(dim=(-2, -1))
    return result


@pytest.mark.parametrize("height, width", [(32, 32), (7, 8), (5, 5)])
def test_same_max_pool_matches_keras_windows(height, width):
    image = torch.randn(2, 3, height, width)
    pooled = models.small.SameMaxPool2d(3, stride=2)(image)
    torch.testing.assert_close(pooled, keras_same_max_pool(image, 3, 2), rtol=0, atol=0)
    if height == 32:  # PyTorch's symmetric padding has the same size but other windows
        assert not torch.equal(pooled, nn.MaxPool2d(3, stride=2, padding=1)(image))


def test_dummy_forward_leaves_batchnorm_untouched():
    model = models.keskar_c1(num_classes=10, input_shape=IMAGE)
    assert model.training
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        assert int(bn.num_batches_tracked) == 0 and torch.all(bn.running_mean == 0)


@pytest.mark.parametrize("build, problem", [
    (lambda: models.resnet18(num_classes=10, input_shape=SEQUENCE), "needs image inputs"),
    (lambda: models.keskar_c1(num_classes=10, input_shape=SEQUENCE), "needs image inputs"),
    (lambda: models.cnn1d(num_classes=10, input_shape=IMAGE), "needs sequence inputs"),
    (lambda: models.cnn1d(num_classes=10, input_shape=SEQUENCE, norm="layer"), "model.norm: invalid value 'layer'"),
    (lambda: models.wide_resnet(num_classes=10, input_shape=IMAGE, depth=20), "6n \\+ 4"),
    (lambda: models.wide_resnet(num_classes=10, input_shape=IMAGE, dropout=1.0), "dropout"),
])
def test_bad_shapes_and_settings_are_config_errors(build, problem):
    with pytest.raises(ConfigError, match=problem):
        build()


@pytest.mark.parametrize("path", sorted(MODEL_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_model_yaml_instantiates(path):
    text = path.read_text()
    assert text.startswith("# ")
    cfg = OmegaConf.load(path)
    assert "num_classes" not in cfg and "input_shape" not in cfg  # the trainer passes those
    if path.stem == "custom":
        assert OmegaConf.is_missing(cfg, "_target_")
        return
    shape = SEQUENCE if path.stem in ("cnn1d", "mlp") else IMAGE
    model = instantiate(cfg, num_classes=10, input_shape=shape)
    if path.stem != "wrn28_10":  # 36.5M parameters: its count is checked above, a forward is slow on CPU
        assert model(torch.randn(2, *shape)).shape == (2, 10)
