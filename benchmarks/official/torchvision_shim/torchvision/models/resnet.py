"""``resnet50()`` with torchvision's child order and parameter names, built from SpineNetLib's blocks."""
from collections import OrderedDict

from torch import nn

from SpineNetLib.models.detector import EXPANSION, _res_layer


def resnet50(pretrained: bool = False, **_ignored) -> nn.Module:
    if pretrained:
        raise ValueError("this stand-in has no pretrained weights")
    layers = OrderedDict(conv1=nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), bn1=nn.BatchNorm2d(64),
                         relu=nn.ReLU(inplace=True), maxpool=nn.MaxPool2d(3, stride=2, padding=1))
    in_ch = 64
    for i, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
        layers[f"layer{i + 1}"] = _res_layer(in_ch, width, blocks, stride)
        in_ch = width * EXPANSION
    layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
    layers["fc"] = nn.Linear(2048, 1000)
    return nn.Sequential(layers)
