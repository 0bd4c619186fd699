"""Build the torchvision/timm model of a spec and cut it into medtl's uniform parts.

The cut reuses the builder's own submodules (no copies), so a checkpoint is always loaded into
the builder model under the builder's key names first, and the wrapper only rearranges modules.
Each family has one function that returns the parts; the forward order they imply must
reproduce the builder's own forward exactly (tests check it).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from medtl.models.registry import BackboneSpec

# Keys of auxiliary heads that checkpoints carry but medtl never builds (eval-only contract).
AUX_PREFIXES: dict[str, tuple[str, ...]] = {
    "googlenet": ("aux1.", "aux2."),
    "inception": ("AuxLogits.",),
}


@dataclass
class Parts:
    """A builder model rearranged: blocks bottom to top, then pool, then classifier.

    ``imagenet_pool`` is set only where the original classifier does not sit on the pooled
    feature vector (AlexNet/VGG: a fixed-size adaptive pool then the FC stack); it replaces
    ``pool`` on the logits path until the classifier is reset.
    """

    blocks: list[tuple[str, nn.Module]]
    pool: nn.Module
    classifier: nn.Module
    imagenet_pool: nn.Module | None
    num_classes: int


def _seq(**modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


def _avg_flatten(avgpool: nn.Module | None = None) -> nn.Sequential:
    # Reuse the builder's own pooling module where it has one, so outputs match bit for bit.
    return _seq(
        avgpool=avgpool if avgpool is not None else nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1)
    )


def _linear_out(classifier: nn.Module) -> int:
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 0


def _split_by_maxpool(features: nn.Sequential) -> list[list[nn.Module]]:
    groups: list[list[nn.Module]] = [[]]
    for module in features:
        groups[-1].append(module)
        if isinstance(module, nn.MaxPool2d):
            groups.append([])
    return [g for g in groups if g]


def _alexnet(model: nn.Module) -> Parts:
    f = model.features
    # One block per convolution: AlexNet has only five, pooling follows conv1, conv2 and conv5.
    groups = [f[0:3], f[3:6], f[6:8], f[8:10], f[10:13]]
    blocks = [(f"conv{i + 1}", nn.Sequential(*g)) for i, g in enumerate(groups)]
    return Parts(
        blocks=blocks,
        pool=_avg_flatten(),
        classifier=model.classifier,
        imagenet_pool=_avg_flatten(model.avgpool),
        num_classes=_linear_out(model.classifier),
    )


def _vgg(model: nn.Module) -> Parts:
    groups = _split_by_maxpool(model.features)
    blocks = [(f"conv{i + 1}", nn.Sequential(*g)) for i, g in enumerate(groups)]
    return Parts(
        blocks=blocks,
        pool=_avg_flatten(),
        classifier=model.classifier,
        imagenet_pool=_avg_flatten(model.avgpool),
        num_classes=_linear_out(model.classifier),
    )


def _googlenet(model: nn.Module) -> Parts:
    m = model
    if m.transform_input or m.aux_logits:
        raise ValueError("googlenet must be built with transform_input=False, aux_logits=False")
    blocks = [
        (
            "stem",
            _seq(
                conv1=m.conv1,
                maxpool1=m.maxpool1,
                conv2=m.conv2,
                conv3=m.conv3,
                maxpool2=m.maxpool2,
            ),
        ),
        (
            "inception3",
            _seq(inception3a=m.inception3a, inception3b=m.inception3b, maxpool3=m.maxpool3),
        ),
        (
            "inception4",
            _seq(
                inception4a=m.inception4a,
                inception4b=m.inception4b,
                inception4c=m.inception4c,
                inception4d=m.inception4d,
                inception4e=m.inception4e,
                maxpool4=m.maxpool4,
            ),
        ),
        ("inception5", _seq(inception5a=m.inception5a, inception5b=m.inception5b)),
    ]
    return Parts(
        blocks, _avg_flatten(m.avgpool), _seq(dropout=m.dropout, fc=m.fc), None, m.fc.out_features
    )


def _inception(model: nn.Module) -> Parts:
    m = model
    if m.transform_input or m.aux_logits:
        raise ValueError("inception_v3 must be built with transform_input=False, aux_logits=False")
    blocks = [
        (
            "stem",
            _seq(
                Conv2d_1a_3x3=m.Conv2d_1a_3x3,
                Conv2d_2a_3x3=m.Conv2d_2a_3x3,
                Conv2d_2b_3x3=m.Conv2d_2b_3x3,
                maxpool1=m.maxpool1,
                Conv2d_3b_1x1=m.Conv2d_3b_1x1,
                Conv2d_4a_3x3=m.Conv2d_4a_3x3,
                maxpool2=m.maxpool2,
            ),
        ),
        ("mixed5", _seq(Mixed_5b=m.Mixed_5b, Mixed_5c=m.Mixed_5c, Mixed_5d=m.Mixed_5d)),
        (
            "mixed6",
            _seq(
                Mixed_6a=m.Mixed_6a,
                Mixed_6b=m.Mixed_6b,
                Mixed_6c=m.Mixed_6c,
                Mixed_6d=m.Mixed_6d,
                Mixed_6e=m.Mixed_6e,
            ),
        ),
        ("mixed7", _seq(Mixed_7a=m.Mixed_7a, Mixed_7b=m.Mixed_7b, Mixed_7c=m.Mixed_7c)),
    ]
    # torchvision applies dropout before flatten; on a (N, C, 1, 1) map that is the same thing.
    return Parts(
        blocks, _avg_flatten(m.avgpool), _seq(dropout=m.dropout, fc=m.fc), None, m.fc.out_features
    )


def _resnet(model: nn.Module) -> Parts:
    m = model
    blocks = [
        ("stem", _seq(conv1=m.conv1, bn1=m.bn1, relu=m.relu, maxpool=m.maxpool)),
        ("layer1", m.layer1),
        ("layer2", m.layer2),
        ("layer3", m.layer3),
        ("layer4", m.layer4),
    ]
    return Parts(blocks, _avg_flatten(m.avgpool), m.fc, None, m.fc.out_features)


def _densenet(model: nn.Module) -> Parts:
    f = model.features
    blocks = [
        ("stem", _seq(conv0=f.conv0, norm0=f.norm0, relu0=f.relu0, pool0=f.pool0)),
        ("dense1", _seq(denseblock1=f.denseblock1, transition1=f.transition1)),
        ("dense2", _seq(denseblock2=f.denseblock2, transition2=f.transition2)),
        ("dense3", _seq(denseblock3=f.denseblock3, transition3=f.transition3)),
        # torchvision applies F.relu after `features`; as a module it makes the last block's
        # output the map Grad-CAM and truncation expect.
        ("dense4", _seq(denseblock4=f.denseblock4, norm5=f.norm5, relu=nn.ReLU())),
    ]
    return Parts(blocks, _avg_flatten(), model.classifier, None, model.classifier.out_features)


# Inverted-residual repeats of torchvision's MobileNetV2 (width 1.0): one stage per (t, c, n, s).
_MOBILENET_V2_REPEATS = (1, 2, 3, 4, 3, 3, 1)


def _mobilenet(model: nn.Module) -> Parts:
    f = model.features
    if len(f) != 2 + sum(_MOBILENET_V2_REPEATS):
        raise ValueError(f"unexpected mobilenet_v2 layout: {len(f)} feature modules")
    blocks: list[tuple[str, nn.Module]] = [("stem", f[0])]
    start = 1
    for i, n in enumerate(_MOBILENET_V2_REPEATS):
        blocks.append((f"stage{i + 1}", nn.Sequential(*f[start : start + n])))
        start += n
    blocks.append(("head", f[start]))
    return Parts(blocks, _avg_flatten(), model.classifier, None, _linear_out(model.classifier))


def _timm_classifier(model: nn.Module, classifier: nn.Module) -> nn.Module:
    # timm applies F.dropout(drop_rate) in forward_head; keep it so training behaves the same.
    rate = float(getattr(model, "drop_rate", 0.0) or 0.0)
    return _seq(dropout=nn.Dropout(rate), fc=classifier) if rate > 0 else classifier


def _efficientnet(model: nn.Module) -> Parts:
    m = model
    blocks: list[tuple[str, nn.Module]] = [("stem", _seq(conv_stem=m.conv_stem, bn1=m.bn1))]
    blocks += [(f"stage{i + 1}", stage) for i, stage in enumerate(m.blocks)]
    blocks.append(("head", _seq(conv_head=m.conv_head, bn2=m.bn2)))
    return Parts(blocks, m.global_pool, _timm_classifier(m, m.classifier), None, m.num_classes)


def _xception(model: nn.Module) -> Parts:
    m = model
    blocks = [
        (
            "stem",
            _seq(conv1=m.conv1, bn1=m.bn1, act1=m.act1, conv2=m.conv2, bn2=m.bn2, act2=m.act2),
        ),
        ("entry1", m.block1),
        ("entry2", m.block2),
        ("entry3", m.block3),
        ("middle", nn.Sequential(*(getattr(m, f"block{i}") for i in range(4, 12)))),
        (
            "exit",
            _seq(
                block12=m.block12,
                conv3=m.conv3,
                bn3=m.bn3,
                act3=m.act3,
                conv4=m.conv4,
                bn4=m.bn4,
                act4=m.act4,
            ),
        ),
    ]
    return Parts(blocks, m.global_pool, _timm_classifier(m, m.fc), None, m.num_classes)


class VitEmbed(nn.Module):
    """Patch embedding, class token and position embedding of a timm ViT (its first block).

    Holds the ViT's own parameters, so the checkpoint's ``cls_token``/``pos_embed`` load
    unchanged. Only the original layout is supported: a class token, no register tokens,
    position embedding covering the class token, fixed image size.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        if (
            vit.cls_token is None
            or vit.reg_token is not None
            or vit.no_embed_class
            or vit.dynamic_img_size
        ):
            raise ValueError("only the original ViT layout (class token, fixed size) is supported")
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        return self.norm_pre(self.patch_drop(x))


class VitTokenPool(nn.Module):
    """Final norm, then the class token: timm's forward_features + forward_head(pre_logits)."""

    def __init__(self, norm: nn.Module, fc_norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.fc_norm = fc_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_norm(self.norm(x)[:, 0])


def _vit(model: nn.Module) -> Parts:
    m = model
    if m.global_pool != "token" or m.attn_pool is not None:
        raise ValueError("only class-token pooling is supported for ViT")
    blocks: list[tuple[str, nn.Module]] = [("embed", VitEmbed(m))]
    blocks += [(f"block{i + 1}", blk) for i, blk in enumerate(m.blocks)]
    classifier = m.head if m.head_drop.p == 0 else _seq(head_drop=m.head_drop, head=m.head)
    return Parts(blocks, VitTokenPool(m.norm, m.fc_norm), classifier, None, m.num_classes)


SPLITTERS: dict[str, Callable[[nn.Module], Parts]] = {
    "alexnet": _alexnet,
    "vgg": _vgg,
    "googlenet": _googlenet,
    "inception": _inception,
    "resnet": _resnet,
    "densenet": _densenet,
    "mobilenet": _mobilenet,
    "efficientnet": _efficientnet,
    "xception": _xception,
    "vit": _vit,
}


def split_model(spec: BackboneSpec, model: nn.Module) -> Parts:
    parts = SPLITTERS[spec.family](model)
    names = tuple(name for name, _ in parts.blocks)
    if names != spec.blocks:
        raise ValueError(f"{spec.name}: blocks {names} differ from the registry's {spec.blocks}")
    return parts


def build_model(spec: BackboneSpec, device: str | torch.device | None = None) -> nn.Module:
    """The builder's model with random weights (or uninitialised on the ``meta`` device).

    GoogLeNet/Inception are built without auxiliary heads (medtl trains and predicts through
    the main head only) and without transform_input (its mean/std live in the spec instead).
    """
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        if spec.builder == "torchvision":
            import torchvision.models

            kwargs: dict[str, object] = {}
            if spec.family in ("googlenet", "inception"):
                kwargs = {"aux_logits": False, "transform_input": False, "init_weights": True}
            return getattr(torchvision.models, spec.arch)(weights=None, **kwargs)
        import timm

        return timm.create_model(spec.arch, pretrained=False)


def set_input_channels(model: nn.Module, conv_path: str, in_chans: int) -> None:
    """Make the first convolution take ``in_chans`` channels, as timm's ``adapt_input_conv`` does.

    From 3 to 1 channel the RGB filters are summed, so a grey image gives the same output as
    the image replicated to RGB. The module is changed in place (timm's TF-"same"-padding
    subclass of Conv2d must survive).
    """
    from timm.models import adapt_input_conv

    conv = model.get_submodule(conv_path)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{conv_path} is {type(conv).__name__}, not Conv2d")
    if conv.in_channels == in_chans:
        return
    if in_chans < 1:
        raise ValueError(f"in_chans must be positive, got {in_chans}")
    if conv.in_channels != 3:
        raise ValueError(f"cannot adapt a {conv.in_channels}-channel input convolution")
    weight = adapt_input_conv(in_chans, conv.weight.detach())
    conv.weight = nn.Parameter(weight.contiguous(), requires_grad=conv.weight.requires_grad)
    conv.in_channels = in_chans


def set_input_channels_unadapted(model: nn.Module, conv_path: str, in_chans: int) -> None:
    """Reshape the first convolution for ``in_chans`` without caring about its values.

    Used before loading a checkpoint saved with another channel count: the load overwrites them.
    """
    conv = model.get_submodule(conv_path)
    if conv.in_channels == in_chans:
        return
    shape = (conv.out_channels, in_chans // conv.groups, *conv.kernel_size)
    grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(conv.weight.new_zeros(shape), requires_grad=grad)
    conv.in_channels = in_chans
