"""torchvision ResNets as PaDiM feature pyramids (the paper's backbones).

torchvision is imported only when a ResNet is built: importing it costs
seconds, which ``import skpadim`` should not pay.
"""

from __future__ import annotations

from torch import nn

from ._registry import BackboneSpec, Tap, register_backbone

_STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetPyramid(nn.Module):
    """A torchvision ResNet cut after its last tapped stage.

    Only the stem and the stages up to the last tap are kept, so the unused
    deeper stages cost neither time nor memory. Parameter names are those of
    torchvision's full network, so its checkpoints load directly.
    """

    def __init__(self, resnet, layers):
        super().__init__()
        self.taps = tuple(layers)
        last = max(_STAGES.index(layer) for layer in self.taps)
        self.stages = _STAGES[: last + 1]
        self.conv1, self.bn1 = resnet.conv1, resnet.bn1
        self.relu, self.maxpool = resnet.relu, resnet.maxpool
        for stage in self.stages:
            setattr(self, stage, getattr(resnet, stage))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for stage in self.stages:
            x = getattr(self, stage)(x)
            if stage in self.taps:
                features.append(x)
        return features


def _pretrained_loader(arch):
    def load_pretrained():
        import torchvision

        weights = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            # torchvision looks in its hub cache first, so a file placed there
            # works offline.
            return weights.get_state_dict(progress=False, check_hash=False)
        except Exception as exc:
            import torch.hub

            filename = weights.url.rsplit("/", 1)[-1]
            raise RuntimeError(
                f"Could not obtain the pretrained {arch} weights ({exc}). "
                f"Offline, download {weights.url} on another machine and either "
                f"place it at {torch.hub.get_dir()}/checkpoints/{filename} or pass "
                f"weights='/path/to/{filename}'."
            ) from exc

    return load_pretrained


def _resnet_spec(arch, widths, default_n_features):
    def build(layers):
        import torchvision

        return ResNetPyramid(getattr(torchvision.models, arch)(weights=None), layers)

    taps = {
        stage: Tap(channels=width, stride=4 * 2**i)
        for i, (stage, width) in enumerate(zip(_STAGES, widths))
    }
    return BackboneSpec(
        name=arch,
        build=build,
        taps=taps,
        default_layers=("layer1", "layer2", "layer3"),
        default_n_features=default_n_features,
        load_pretrained=_pretrained_loader(arch),
        description=f"torchvision {arch}, ImageNet weights from torchvision",
    )


RESNET18 = register_backbone(_resnet_spec("resnet18", (64, 128, 256, 512), 100))
RESNET34 = register_backbone(_resnet_spec("resnet34", (64, 128, 256, 512), 100))
RESNET50 = register_backbone(_resnet_spec("resnet50", (256, 512, 1024, 2048), 550))
WIDE_RESNET50_2 = register_backbone(
    _resnet_spec("wide_resnet50_2", (256, 512, 1024, 2048), 550)
)
