"""Weight converters on tiny synthetic TensorFlow.js and ONNX models built here."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper, save_model

from captioning.models.convert import (
    KERAS_BN_EPS,
    VGG_CONV_INDICES,
    VGG_CONV_NAMES,
    convert_keras_resnet,
    convert_onnx_vgg16,
    keras_resnet_module,
    read_tfjs_weights,
)

RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype("f4")


def keras_conv_bn(prefix_conv: str, prefix_bn: str, kh: int, cin: int, cout: int) -> dict:
    return {
        f"{prefix_conv}/kernel": rand(kh, kh, cin, cout),  # HWIO
        f"{prefix_conv}/bias": rand(cout),
        f"{prefix_bn}/gamma": rand(cout),
        f"{prefix_bn}/beta": rand(cout),
        f"{prefix_bn}/moving_mean": rand(cout),
        f"{prefix_bn}/moving_variance": RNG.uniform(0.5, 2.0, cout).astype("f4"),
    }


def write_tfjs(folder, weights: dict[str, np.ndarray], shards: int = 3) -> None:
    """A tfjs layers model.json + binary shards, split mid-tensor like the real ones."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = b"".join(np.ascontiguousarray(v, "<f4").tobytes() for v in weights.values())
    step = -(-len(buf) // shards)
    paths = []
    for i in range(shards):
        name = f"group1-shard{i + 1}of{shards}.bin"
        (folder / name).write_bytes(buf[i * step : (i + 1) * step])
        paths.append(name)
    manifest = [
        {
            "paths": paths,
            "weights": [
                {"name": k, "shape": list(v.shape), "dtype": "float32"} for k, v in weights.items()
            ],
        }
    ]
    (folder / "model.json").write_text(json.dumps({"weightsManifest": manifest}))


def test_tfjs_reader_reassembles_shards(tmp_path):
    weights = {"a/kernel": rand(3, 3, 2, 4), "a/bias": rand(4), "b/gamma": rand(7)}
    write_tfjs(tmp_path, weights)
    got = read_tfjs_weights(tmp_path)
    assert list(got) == list(weights)
    for k in weights:
        np.testing.assert_array_equal(got[k], weights[k])


def test_tfjs_reader_rejects_size_mismatch(tmp_path):
    write_tfjs(tmp_path, {"a/bias": rand(4)}, shards=1)
    with open(tmp_path / "group1-shard1of1.bin", "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(ValueError, match="manifest lists"):
        read_tfjs_weights(tmp_path)


def test_layer_name_mapping():
    assert keras_resnet_module("conv1") == "body.0"
    assert keras_resnet_module("bn_conv1") == "body.1"
    assert keras_resnet_module("res2a_branch2a") == "body.4.0.conv1"
    assert keras_resnet_module("bn3d_branch2c") == "body.5.3.bn3"
    assert keras_resnet_module("res4f_branch2b") == "body.6.5.conv2"
    assert keras_resnet_module("res5a_branch1") == "body.7.0.downsample.0"
    assert keras_resnet_module("bn5a_branch1") == "body.7.0.downsample.1"
    assert keras_resnet_module("fc1000") == "fc"
    with pytest.raises(ValueError):
        keras_resnet_module("res6a_branch2a")


def test_conv_bias_and_bn_eps_fold_exactly():
    """Keras conv(+bias) -> BN(eps 1e-3) equals torchvision conv(no bias) -> BN(eps 1e-5)."""
    w = keras_conv_bn("res2a_branch2b", "bn2a_branch2b", 3, 4, 6)
    state = convert_keras_resnet(w)
    x = torch.randn(2, 4, 9, 9)
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    kernel = t["res2a_branch2b/kernel"].permute(3, 2, 0, 1)
    keras = F.batch_norm(
        F.conv2d(x, kernel, t["res2a_branch2b/bias"], padding=1),
        t["bn2a_branch2b/moving_mean"],
        t["bn2a_branch2b/moving_variance"],
        t["bn2a_branch2b/gamma"],
        t["bn2a_branch2b/beta"],
        eps=KERAS_BN_EPS,
    )
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(6)  # eps 1e-5
    conv.load_state_dict({"weight": state["body.4.0.conv2.weight"]})
    bn.load_state_dict({k.split(".")[-1]: v for k, v in state.items() if ".bn2." in k})
    with torch.no_grad():
        ours = bn.eval()(conv(x))
    torch.testing.assert_close(ours, keras, rtol=1e-4, atol=1e-4)


def test_fc_is_transposed_and_shortcut_mapped():
    w = {"fc1000/kernel": rand(8, 5), "fc1000/bias": rand(5)}
    w |= keras_conv_bn("res3a_branch1", "bn3a_branch1", 1, 4, 6)
    state = convert_keras_resnet(w)
    np.testing.assert_array_equal(state["fc.weight"].numpy(), w["fc1000/kernel"].T)
    assert state["body.5.0.downsample.0.weight"].shape == (6, 4, 1, 1)
    folded = w["bn3a_branch1/moving_mean"] - w["res3a_branch1/bias"]
    np.testing.assert_allclose(state["body.5.0.downsample.1.running_mean"].numpy(), folded)


def test_conv_without_its_bn_is_an_error():
    w = {"res2a_branch2a/kernel": rand(1, 1, 4, 4), "res2a_branch2a/bias": rand(4)}
    with pytest.raises(ValueError, match="batch norm"):
        convert_keras_resnet(w)


def onnx_with(tensors: dict[str, np.ndarray]) -> bytes:
    inits = [numpy_helper.from_array(v, k) for k, v in tensors.items()]
    graph = helper.make_graph([], "weights", [], [], initializer=inits)
    buf = io.BytesIO()
    save_model(helper.make_model(graph), buf)
    return buf.getvalue()


def test_onnx_vgg_maps_13_convs_in_order():
    tensors, cin = {}, 3
    for i, conv in enumerate(VGG_CONV_NAMES):
        cout = i + 2
        tensors[f"functional_1/{conv}_1/convolution/ReadVariableOp:0"] = rand(cout, cin, 3, 3)
        tensors[f"functional_1/{conv}_1/Squeeze:0"] = rand(cout)
        cin = cout
    tensors["functional_1/dense_1/MatMul/ReadVariableOp:0"] = rand(4, 2)  # a head to discard
    state = convert_onnx_vgg16(onnx_with(tensors))
    assert len(state) == 26
    for idx, conv in zip(VGG_CONV_INDICES, VGG_CONV_NAMES, strict=True):
        k = tensors[f"functional_1/{conv}_1/convolution/ReadVariableOp:0"]
        np.testing.assert_array_equal(state[f"body.{idx}.weight"].numpy(), k)
    assert not any("dense" in k for k in state)


def test_onnx_without_vgg_layers_is_an_error():
    with pytest.raises(ValueError, match="block1_conv1"):
        convert_onnx_vgg16(onnx_with({"x": rand(2)}))
