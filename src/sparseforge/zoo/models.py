"""Models from the sparsity literature, sized for 28x28 grayscale images.

All models take ``[B, 1, 28, 28]`` inputs (the MLP flattens internally) and
return ``[B, num_classes]`` logits, so they can be swapped freely in demos and
benchmarks. Layers are named attributes (``fc1``, ``conv3``, ``layer2.0.conv1``)
so that sparsity reports and target patterns read naturally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.architectures import ARCHITECTURES, build
from sparseforge.errors import SparseforgeError

__all__ = ["BasicBlock", "Conv4", "LeNet300100", "ResNet20", "build_model", "classifier_names"]


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SparseforgeError(f"{name} must be a positive integer, got {value!r}")


class LeNet300100(nn.Module):
    """LeNet-300-100: a 784-300-100-10 fully connected network with ReLU.

    The MLP used for MNIST in "The Lottery Ticket Hypothesis: Finding Sparse,
    Trainable Neural Networks" (Frankle & Carbin, ICLR 2019). Layers ``fc1``,
    ``fc2``, ``fc3``; inputs of any shape ``[B, ...]`` with 784 values per
    example are flattened.

    Args:
        num_classes: number of output logits. Default 10.

    >>> sum(p.numel() for p in LeNet300100().parameters())
    266610
    """

    input_shape = (1, 28, 28)
    num_classes = 10

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        self.num_classes = num_classes
        self.fc1 = nn.Linear(28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[B, num_classes]`` for images ``[B, 1, 28, 28]``."""
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class Conv4(nn.Module):
    """Conv-4: four 3x3 conv layers then three fully connected layers.

    From "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
    Networks" (Frankle & Carbin, ICLR 2019), adapted from 32x32 CIFAR to 28x28
    inputs: conv64-conv64-pool, conv128-conv128-pool (padding 1, so 28 -> 14 ->
    7), then fc 6272->256, 256->256, 256->num_classes, ReLU throughout.

    Args:
        num_classes: number of output logits. Default 10.

    >>> sum(p.numel() for p in Conv4().parameters())
    1933258
    """

    input_shape = (1, 28, 28)
    num_classes = 10

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(1, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 7 * 7, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[B, num_classes]`` for images ``[B, 1, 28, 28]``."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(F.relu(self.conv4(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """Residual block of two 3x3 conv+BN layers, as in He et al. (2016).

    When the stride or width changes, the shortcut is a 1x1 conv + BN
    projection (the paper's option B), otherwise the identity.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first conv and of the shortcut. Default 1.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for 28x28 grayscale images.

    The CIFAR ResNet of "Deep Residual Learning for Image Recognition" (He et
    al., CVPR 2016) with depth 20: a 3x3 stem conv, three stages of three
    :class:`BasicBlock` with widths ``w, 2w, 4w`` (stride 2 at the start of
    stages 2 and 3, so 28 -> 14 -> 7), global average pooling and a linear
    classifier. Projection shortcuts (option B) where shapes change; convs
    use Kaiming-normal init.

    Args:
        num_classes: number of output logits. Default 10.
        width: channels of the first stage, ``w``. Default 16 (~0.27M parameters).

    >>> sum(p.numel() for p in ResNet20().parameters())
    272186
    """

    input_shape = (1, 28, 28)
    num_classes = 10

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("width", width)
        self.num_classes = num_classes
        self.width = width
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_stage(width, width, stride=1)
        self.layer2 = self._make_stage(width, 2 * width, stride=2)
        self.layer3 = self._make_stage(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al.'s init: keeps activation variance stable through the
                # ReLU stack, which matters without a warm-up schedule.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(2)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[B, num_classes]`` for images ``[B, 1, 28, 28]``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def classifier_names() -> list[str]:
    """The registered architectures that are this module's image classifiers (``lenet300``, ``conv4``,
    ``resnet20``): the models the demo and the benchmarks train on Fashion-MNIST."""
    return [name for name, entry in ARCHITECTURES.items() if getattr(entry, "__module__", None) == __name__]


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a model of :data:`sparseforge.architectures.ARCHITECTURES` by name.

    Args:
        name: ``"lenet300"``, ``"conv4"``, ``"resnet20"``, or another registered architecture.
        **kwargs: passed to the constructor (``num_classes``; ``width`` for
            ``resnet20``).

    Raises:
        SparseforgeError: unknown name or constructor argument.

    >>> model = build_model("lenet300")
    >>> sum(p.numel() for p in model.parameters())
    266610
    >>> build_model("vgg")
    Traceback (most recent call last):
    ...
    sparseforge.errors.SparseforgeError: unknown architecture 'vgg' (known: lenet300, conv4, resnet20, hf)
    """
    return build(name, **kwargs)
