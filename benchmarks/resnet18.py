"""ResNet-18 (He et al. 2016) written out here (torchvision is not usable in this environment),
and its export to ONNX at 224x224 for the scalable-bounds benchmark.

The weights are random (Kaiming init) and BatchNorm gets randomized running statistics and
affine parameters, then the model is put in eval mode, so the export carries realistic folded
BN scalings. Nothing here is committed as a binary: the ``.onnx`` goes to a temp folder or to
``--out`` (``out/`` is the convention in this repository).

    python benchmarks/resnet18.py --out out/resnet18.onnx
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the identity (or a 1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.down is None else self.down(x)
        return torch.relu(out + skip)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000, width: int = 64):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, c = [], w
        for i, c_out in enumerate([w, 2 * w, 4 * w, 8 * w]):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_resnet18(seed: int = 0, num_classes: int = 1000) -> ResNet18:
    """A ResNet-18 in eval mode with random weights and randomized BatchNorm statistics."""
    torch.manual_seed(seed)
    model = ResNet18(num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return model.eval()


def export(path: Path, seed: int = 0, size: int = 224) -> Path:
    model = make_resnet18(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.randn(1, 3, size, size)
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="where to write the .onnx (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="lipverify-resnet18-")) / "resnet18.onnx"
    print(export(out, args.seed, args.size))


if __name__ == "__main__":
    main()
