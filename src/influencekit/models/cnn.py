"""A small convolutional net and a small ResNet for 28×28 (or any square) grey images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


class CNN(nn.Module):
    """``conv(c1)–pool–conv(c2)–pool–fc(hidden)–fc(classes)`` with tanh; 106k parameters at the
    defaults on 28×28 inputs (the MNIST benchmark model)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 channels: tuple[int, int] = (16, 32), hidden: int = 64):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        side = image_size // 4
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(torch.tanh(self.conv1(x)), 2)
        x = F.avg_pool2d(torch.tanh(self.conv2(x)), 2)
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise InputError(f"norm must be 'group', 'batch' or 'none', got {kind!r}.")


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with normalisation and a (projected when needed) skip."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, c_out, groups)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                      _norm(norm, c_out, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.gelu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.gelu(out + self.skip(x))


class ResNet(nn.Module):
    """A small ResNet: stem conv, one stage of ``blocks`` residual blocks per entry of
    ``widths`` (stride 2 from the second stage on), global average pooling, linear head.

    Defaults (widths 16/32/64, two blocks a stage) give 175k parameters on 1-channel input;
    ``widths=(24, 48, 96)`` 392k, ``blocks=1`` 78k. ``norm="group"`` (default) keeps every
    example's output independent of the batch, also in training. With ``norm="batch"``,
    training uses batch statistics, while influence is computed in eval mode (``Task`` does
    this) on the running statistics, so per-example losses there depend on the example alone.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 widths: Sequence[int] = (16, 32, 64), blocks: int = 2, norm: str = "group",
                 groups: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  _norm(norm, widths[0], groups), nn.GELU())
        stages: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(c, w, stride, norm, groups))
                c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))
