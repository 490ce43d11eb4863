"""The safetensors architecture spec (lipverify.load.spec) and the committed fixtures."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from lipverify.errors import UserInputError
from lipverify.load.spec import (
    LAYER_TYPES,
    build_module,
    infer_mlp_spec,
    load_safetensors_model,
    load_spec,
    module_spec_tensors,
    spec_tensor_names,
    validate_spec,
)

torch.set_num_threads(1)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ATOL = 1e-5


def spec_of(layers, input_shape):
    return {"format": "lipverify-spec", "version": 1, "input_shape": list(input_shape), "layers": layers}


def rand(*shape, seed=[0]):
    seed[0] += 1
    g = torch.Generator().manual_seed(seed[0])
    return torch.randn(*shape, generator=g)


# ---------------------------------------------------------------------------------------------
# An independent functional reference for every layer type
# ---------------------------------------------------------------------------------------------


def reference(layers, t, x):
    for layer in layers:
        kind = layer["type"]
        if kind == "flatten":
            x = x.flatten(1)
        elif kind == "linear":
            x = F.linear(x, t[layer["weight"]], t.get(layer.get("bias")))
        elif kind in ("conv1d", "conv2d"):
            pad = layer.get("padding", 0)
            if isinstance(pad, int):
                pad = [pad] * (2 if kind == "conv1d" else 4)
            if kind == "conv1d":
                pad = pad * 2 if len(pad) == 1 else pad
                x = F.pad(x, (pad[0], pad[1]))
                fn = F.conv1d
            else:
                pad = pad * 2 if len(pad) == 2 else (pad * 4 if len(pad) == 1 else pad)
                x = F.pad(x, (pad[1], pad[3], pad[0], pad[2]))  # ONNX order: top, left, bottom, right
                fn = F.conv2d
            x = fn(x, t[layer["weight"]], t.get(layer.get("bias")), stride=layer.get("stride", 1),
                   dilation=layer.get("dilation", 1), groups=layer.get("groups", 1))
        elif kind == "batchnorm":
            x = F.batch_norm(x, t[layer["running_mean"]], t[layer["running_var"]], t.get(layer.get("weight")),
                             t.get(layer.get("bias")), training=False, eps=layer.get("eps", 1e-5))
        elif kind == "maxpool2d":
            x = F.max_pool2d(x, layer["kernel_size"], layer.get("stride"), layer.get("padding", 0))
        elif kind == "avgpool2d":
            x = F.avg_pool2d(x, layer["kernel_size"], layer.get("stride"), layer.get("padding", 0),
                             count_include_pad=layer.get("count_include_pad", True))
        elif kind == "global_avgpool":
            x = x.mean(dim=tuple(range(2, x.dim())))
        elif kind == "residual":
            x = x + reference(layer["layers"], t, x)
        else:
            x = {
                "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu,
                "leaky_relu": lambda v: F.leaky_relu(v, layer.get("negative_slope", 0.01)),
                "elu": lambda v: F.elu(v, layer.get("alpha", 1.0)),
                "gelu": lambda v: F.gelu(v, approximate=layer.get("approximate", "none")),
                "softplus": lambda v: F.softplus(v, layer.get("beta", 1.0), layer.get("threshold", 20.0)),
            }[kind](x)
    return x


def everything_spec():
    """A network using every layer type (conv1d in its own network below)."""
    t = {
        "c1.weight": rand(4, 2, 3, 3), "c1.bias": rand(4),
        "bn.weight": rand(4).abs() + 0.5, "bn.bias": rand(4), "bn.running_mean": rand(4),
        "bn.running_var": rand(4).abs() + 0.5,
        "c2.weight": rand(6, 2, 3, 3),  # groups=2, no bias
        "r1.weight": rand(6, 6, 3, 3) * 0.2, "r1.bias": rand(6),
        "r2.weight": rand(6, 6, 1, 1) * 0.2,
        "fc1.weight": rand(16, 6), "fc1.bias": rand(16),
        "inner.weight": rand(16, 16) * 0.2, "inner.bias": rand(16),
        "fc2.weight": rand(5, 16),
    }
    layers = [
        {"type": "conv2d", "weight": "c1.weight", "bias": "c1.bias", "stride": 1, "padding": [1, 0, 2, 1]},
        {"type": "batchnorm", "weight": "bn.weight", "bias": "bn.bias", "running_mean": "bn.running_mean",
         "running_var": "bn.running_var", "eps": 1e-3},
        {"type": "leaky_relu", "negative_slope": 0.1},
        {"type": "conv2d", "weight": "c2.weight", "stride": [2, 1], "padding": [1, 2], "dilation": [1, 2], "groups": 2},
        {"type": "elu", "alpha": 0.5},
        {"type": "residual", "layers": [
            {"type": "conv2d", "weight": "r1.weight", "bias": "r1.bias", "padding": 1},
            {"type": "gelu"},
            {"type": "conv2d", "weight": "r2.weight"},
        ]},
        {"type": "maxpool2d", "kernel_size": 2, "stride": 1},
        {"type": "avgpool2d", "kernel_size": [2, 2], "stride": 1, "padding": 1, "count_include_pad": False},
        {"type": "sigmoid"},
        {"type": "global_avgpool"},
        {"type": "linear", "weight": "fc1.weight", "bias": "fc1.bias"},
        {"type": "tanh"},
        {"type": "residual", "layers": [
            {"type": "linear", "weight": "inner.weight", "bias": "inner.bias"},
            {"type": "silu"},
            {"type": "residual", "layers": [{"type": "softplus", "beta": 2.0}]},
            {"type": "gelu", "approximate": "tanh"},
        ]},
        {"type": "relu"},
        {"type": "linear", "weight": "fc2.weight"},
    ]
    return spec_of(layers, (2, 9, 8)), t


def conv1d_spec():
    t = {"a.weight": rand(4, 3, 3), "a.bias": rand(4), "b.weight": rand(4, 2, 2),
         "bn.running_mean": rand(4), "bn.running_var": rand(4).abs() + 0.1,
         "fc.weight": rand(3, 4 * 5), "fc.bias": rand(3)}
    layers = [
        {"type": "conv1d", "weight": "a.weight", "bias": "a.bias", "padding": [2, 0], "dilation": 2},
        {"type": "batchnorm", "running_mean": "bn.running_mean", "running_var": "bn.running_var"},
        {"type": "softplus"},
        {"type": "conv1d", "weight": "b.weight", "stride": 2, "padding": 1, "groups": 2},
        {"type": "flatten"},
        {"type": "linear", "weight": "fc.weight", "bias": "fc.bias"},
    ]
    return spec_of(layers, (3, 10)), t


@pytest.mark.parametrize("make", [everything_spec, conv1d_spec])
def test_build_matches_functional_reference(make):
    spec, t = make()
    module = build_module(spec, t)
    assert not module.training and all(p.dtype == torch.float32 for p in module.parameters())
    x = rand(7, *spec["input_shape"])
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(spec["layers"], t, x), atol=ATOL, rtol=1e-5)


def test_every_layer_type_is_covered():
    used = set()

    def walk(layers):
        for layer in layers:
            used.add(layer["type"])
            if layer["type"] == "residual":
                walk(layer["layers"])

    walk(everything_spec()[0]["layers"])
    walk(conv1d_spec()[0]["layers"])
    assert used == set(LAYER_TYPES)


def test_round_trip_through_safetensors_after_fine_tuning(tmp_path):
    spec, t = everything_spec()
    module = build_module(spec, t)
    with torch.no_grad():  # "fine-tune": change every parameter and buffer
        for p in list(module.parameters()) + [b for n, b in module.named_buffers() if "running" in n]:
            p.mul_(1.1).add_(0.01)
    tensors = module_spec_tensors(module, spec)
    assert set(tensors) == set(t) and all(tensors[k].shape == t[k].shape for k in t)
    save_file(tensors, str(tmp_path / "net.safetensors"))
    (tmp_path / "net.json").write_text(json.dumps(spec))
    loaded, loaded_spec, notes = load_safetensors_model(tmp_path / "net.safetensors")
    assert loaded_spec == validate_spec(spec)
    assert any("net.json found beside" in n for n in notes)
    x = rand(4, *spec["input_shape"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module(x), atol=0, rtol=0)
        torch.testing.assert_close(loaded(x), reference(spec["layers"], tensors, x), atol=ATOL, rtol=1e-5)


def test_batchnorm_running_stats_untouched_by_building_and_forward():
    spec, t = everything_spec()
    before = {k: v.clone() for k, v in t.items()}
    module = build_module(spec, t)
    with torch.no_grad():
        module(rand(8, *spec["input_shape"]) * 5 + 3)
    after = module_spec_tensors(module, spec)
    for name in ("bn.running_mean", "bn.running_var"):
        assert torch.equal(after[name], before[name])


@pytest.mark.parametrize("pads,shape", [([1, 0, 2, 3], (2, 5, 6)), ([0, 2, 0, 2], (2, 5, 6)), ([2, 0], (2, 7))])
def test_asymmetric_padding_means_onnx_pads(pads, shape):
    """Known answer from onnxruntime: padding [top, left, bottom, right] (conv1d: [begin, end])
    is exactly ONNX Conv's ``pads`` attribute."""
    two_d = len(shape) == 3
    w = rand(3, shape[0], *((2, 3) if two_d else (3,)))
    spec = spec_of([{"type": "conv2d" if two_d else "conv1d", "weight": "w", "padding": pads}], shape)
    x = rand(2, *shape)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=pads)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, *shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w.numpy(), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        got = build_module(spec, {"w": w})(x).numpy()
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_spec_tensor_names_in_order():
    spec, _ = everything_spec()
    names = spec_tensor_names(spec)
    assert names[:3] == ["c1.weight", "c1.bias", "bn.weight"] and names[-1] == "fc2.weight"
    assert "inner.weight" in names and len(names) == len(set(names))


# ---------------------------------------------------------------------------------------------
# Bad input: UserInputError with a useful message
# ---------------------------------------------------------------------------------------------

MLP_T = {"fc1.weight": torch.ones(4, 6), "fc1.bias": torch.zeros(4), "fc2.weight": torch.ones(2, 4)}
MLP_LAYERS = [{"type": "linear", "weight": "fc1.weight", "bias": "fc1.bias"}, {"type": "relu"},
              {"type": "linear", "weight": "fc2.weight"}]


@pytest.mark.parametrize("mutate,pattern", [
    (lambda s: s["layers"].insert(1, {"type": "swish"}), r"layers\[1\]: unknown layer type 'swish'.*known types: flatten"),
    (lambda s: s["layers"][0].update(strides=2), r"layers\[0\] \(linear\): unknown key\(s\) 'strides'"),
    (lambda s: s["layers"][0].pop("weight"), r"layers\[0\] \(linear\): missing required key 'weight'"),
    (lambda s: s["layers"][1].update(type="leaky_relu", negative_slope="big"), r"layers\[1\] \(leaky_relu\): 'negative_slope'"),
    (lambda s: s["layers"].append({"type": "residual", "layers": [{"type": "conv2d", "weight": "w", "stride": 0}]}),
     r"layers\[3\] \(residual\)\.layers\[0\] \(conv2d\): 'stride' = 0"),
    (lambda s: s["layers"].append({"type": "conv2d", "weight": "w", "padding": [1, 2, 3]}), r"layers\[3\] \(conv2d\): 'padding'"),
    (lambda s: s.update(format="onnx"), r"'format' must be 'lipverify-spec'"),
    (lambda s: s.update(version=2), r"unsupported 'version' 2"),
    (lambda s: s.update(input_shape=[0, 6]), r"'input_shape' must be a non-empty list of positive integers"),
    (lambda s: s.update(layers=[]), r"'layers' must be a non-empty list"),
    (lambda s: s.update(extra=1), r"unknown top-level key\(s\) 'extra'"),
])
def test_bad_spec_structure(tmp_path, mutate, pattern):
    spec = spec_of(json.loads(json.dumps(MLP_LAYERS)), (6,))
    mutate(spec)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(UserInputError, match=pattern):
        load_spec(path)


@pytest.mark.parametrize("tensors,pattern", [
    ({**MLP_T, "fc1.weight": torch.ones(4, 5)}, r"layers\[0\] \(linear\): weight tensor 'fc1.weight' has shape \[4, 5\], expected \[4, 6\]"),
    ({k: v for k, v in MLP_T.items() if k != "fc2.weight"} | {"fc_2.weight": torch.ones(2, 4)},
     r"layers\[2\] \(linear\): weight tensor 'fc2.weight' is not in the weights file; similar names: fc_2.weight"),
    ({**MLP_T, "fc1.bias": torch.zeros(3)}, r"bias tensor 'fc1.bias' has shape \[3\], expected \[4\]"),
    ({**MLP_T, "fc2.weight": torch.ones(2, 3)}, r"layers\[2\] \(linear\).*shape \[2, 3\], expected \[2, 4\]"),
    ({**MLP_T, "fc1.weight": torch.ones(4, 6).index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("nan")))},
     r"layers\[0\] \(linear\): tensor 'fc1.weight' contains NaN or Inf"),
    ({**MLP_T, "fc1.bias": torch.tensor([0.0, float("inf"), 0.0, 0.0])}, r"'fc1.bias' contains NaN or Inf"),
    ({**MLP_T, "fc1.weight": torch.full((4, 6), 1e300, dtype=torch.float64)}, r"'fc1.weight' overflows float32"),
    ({**MLP_T, "fc1.weight": torch.ones(4, 6, dtype=torch.int64)}, r"'fc1.weight' has dtype torch.int64"),
])
def test_bad_tensors(tensors, pattern):
    with pytest.raises(UserInputError, match=pattern):
        build_module(spec_of(MLP_LAYERS, (6,)), tensors)


def test_shape_errors_name_the_layer():
    conv = {"w": torch.ones(4, 3, 3, 3)}
    with pytest.raises(UserInputError, match=r"layers\[0\] \(conv2d\): weight tensor 'w' has shape \[4, 3, 3, 3\], expected \[4, 2, 3, 3\]"):
        build_module(spec_of([{"type": "conv2d", "weight": "w"}], (2, 5, 5)), conv)
    with pytest.raises(UserInputError, match=r"layers\[1\] \(linear\): needs a flat input but gets shape \[4, 3, 3\]; add a"):
        build_module(spec_of([{"type": "conv2d", "weight": "w"}, {"type": "linear", "weight": "fc"}], (3, 5, 5)),
                     {**conv, "fc": torch.ones(2, 36)})
    with pytest.raises(UserInputError, match=r"layers\[0\] \(residual\): the residual body maps shape \[6\] to \[4\]"):
        build_module(spec_of([{"type": "residual", "layers": MLP_LAYERS[:1]}], (6,)), MLP_T)
    with pytest.raises(UserInputError, match=r"layers\[0\] \(conv2d\): cannot apply to input of shape \[3, 2, 2\]"):
        build_module(spec_of([{"type": "conv2d", "weight": "w"}], (3, 2, 2)), conv)
    with pytest.raises(UserInputError, match=r"groups=2 must divide in_channels=3"):
        build_module(spec_of([{"type": "conv2d", "weight": "w", "groups": 2}], (3, 5, 5)), conv)
    with pytest.raises(UserInputError, match=r"layers\[0\] \(maxpool2d\): needs input \(channels, height, width\)"):
        build_module(spec_of([{"type": "maxpool2d", "kernel_size": 2}], (6,)), {})


def test_bad_files(tmp_path):
    bad_json = tmp_path / "a.json"
    bad_json.write_text('{"format": "lipverify-spec", "version": 1,,}')
    with pytest.raises(UserInputError, match=r"a.json' is not valid JSON: line 1"):
        load_spec(bad_json)
    with pytest.raises(UserInputError, match="cannot read spec"):
        load_spec(tmp_path / "missing.json")
    corrupt = tmp_path / "w.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 32)
    with pytest.raises(UserInputError, match=r"cannot read w.safetensors as safetensors"):
        load_safetensors_model(corrupt)
    truncated = tmp_path / "t.safetensors"
    save_file(MLP_T, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with pytest.raises(UserInputError, match=r"cannot read t.safetensors as safetensors"):
        load_safetensors_model(truncated)
    with pytest.raises(UserInputError, match="does not exist"):
        load_safetensors_model(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------
# Inference without a spec
# ---------------------------------------------------------------------------------------------


def chain_tensors(names=("layers.0", "layers.2", "layers.10"), dims=(12, 8, 6, 3), bias=(True, True, False)):
    t = {}
    for k, (name, has_bias) in enumerate(zip(names, bias)):
        t[f"{name}.weight"] = rand(dims[k + 1], dims[k])
        if has_bias:
            t[f"{name}.bias"] = rand(dims[k + 1])
    return t


def test_infer_three_layer_chain_with_notes():
    t = chain_tensors()
    spec, notes = infer_mlp_spec(t, activation="tanh")
    linears = [layer for layer in spec["layers"] if layer["type"] == "linear"]
    assert [layer["weight"] for layer in linears] == ["layers.0.weight", "layers.2.weight", "layers.10.weight"]
    assert [layer["type"] for layer in spec["layers"]] == ["linear", "tanh", "linear", "tanh", "linear"]
    assert spec["input_shape"] == [12] and "bias" not in linears[2]
    text = "\n".join(notes)
    assert "3-layer dense network 12 -> 8 -> 6 -> 3" in text and "natural sort" in text
    assert "assumed activation: tanh" in text and "no bias for layers.10.weight" in text
    x = rand(5, 12)
    y = torch.tanh(F.linear(x, t["layers.0.weight"], t["layers.0.bias"]))
    y = torch.tanh(F.linear(y, t["layers.2.weight"], t["layers.2.bias"]))
    with torch.no_grad():
        torch.testing.assert_close(build_module(spec, t)(x), F.linear(y, t["layers.10.weight"]))


def test_infer_orders_by_shape_when_names_do_not_chain():
    t = chain_tensors(names=("c", "b", "a"))  # names sort a, b, c: 6->3, 8->6, 12->8 does not chain
    spec, notes = infer_mlp_spec(t, input_shape=(3, 2, 2))
    assert [layer.get("weight") for layer in spec["layers"] if layer["type"] == "linear"] == ["c.weight", "b.weight", "a.weight"]
    assert spec["layers"][0] == {"type": "flatten"} and spec["input_shape"] == [3, 2, 2]
    assert any("by shape" in n for n in notes) and any("flattened" in n for n in notes)


def test_infer_refuses_guesses():
    with pytest.raises(UserInputError, match="do not chain"):
        infer_mlp_spec({"a.weight": torch.ones(3, 4), "b.weight": torch.ones(5, 6)})
    with pytest.raises(UserInputError, match="several orders fit"):  # 4->4, 4->4, 4->2 named z, y, x: x first breaks
        infer_mlp_spec({"x.weight": torch.ones(2, 4), "y.weight": torch.ones(4, 4) * 2, "z.weight": torch.ones(4, 4)})
    with pytest.raises(UserInputError, match=r"conv.weight \[4, 1, 3, 3\].*write a spec"):
        infer_mlp_spec({"conv.weight": torch.ones(4, 1, 3, 3), "fc.weight": torch.ones(2, 4)})
    with pytest.raises(UserInputError, match="no 2-D"):
        infer_mlp_spec({"W1": torch.ones(3, 4)})
    with pytest.raises(UserInputError, match=r"input shape \[1, 5\] has 5 values"):
        infer_mlp_spec(chain_tensors(), input_shape=(1, 5))
    with pytest.raises(UserInputError, match="unknown activation"):
        infer_mlp_spec(chain_tensors(), activation="swish")


def test_load_without_spec_infers_and_reports(tmp_path):
    t = {k: v.double() for k, v in chain_tensors().items()}
    t["step"] = torch.tensor(3)  # integer leftovers are ignored by inference
    save_file(t, str(tmp_path / "m.safetensors"))
    module, spec, notes = load_safetensors_model(tmp_path / "m.safetensors", activation="leaky_relu")
    assert [layer["type"] for layer in spec["layers"]][1] == "leaky_relu"
    text = "\n".join(notes)
    assert "negative_slope 0.01" in text and "float64 were converted to float32" in text and "not used by the spec: step" in text
    # an explicit spec wins over inference, and input_shape may override it
    spec_path = tmp_path / "other.json"
    spec_path.write_text(json.dumps(spec_of([{"type": "flatten"}] + [
        {"type": "linear", "weight": "layers.0.weight"}, {"type": "linear", "weight": "layers.2.weight"},
        {"type": "linear", "weight": "layers.10.weight"}], (12,))))
    _, spec2, notes2 = load_safetensors_model(tmp_path / "m.safetensors", spec_path=spec_path, input_shape=(3, 4))
    assert spec2["input_shape"] == [3, 4] and any("other.json" in n for n in notes2)


# ---------------------------------------------------------------------------------------------
# The committed fixtures
# ---------------------------------------------------------------------------------------------

FIXTURE_NAMES = ["mlp", "cnn_bn", "resmlp"]


def test_fixture_data():
    train, test = np.load(FIXTURES / "digits_train.npz"), np.load(FIXTURES / "digits_test.npz")
    assert train["x"].shape == (1347, 1, 8, 8) and test["x"].shape == (450, 1, 8, 8)
    for d in (train, test):
        assert d["x"].dtype == np.float32 and d["y"].dtype == np.int64
        assert d["x"].min() == 0.0 and d["x"].max() == 1.0
        assert set(np.unique(d["y"])) == set(range(10))
    assert np.allclose(np.bincount(test["y"]) / 450, np.bincount(train["y"]) / 1347, atol=0.01)  # stratified
    for path in FIXTURES.iterdir():
        assert path.stat().st_size < 200_000, path


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_formats_agree_and_are_accurate(name):
    from lipverify.load.onnx2torch_compat import convert_onnx

    data = np.load(FIXTURES / "digits_test.npz")
    x, y = data["x"], data["y"]
    module, spec, _ = load_safetensors_model(FIXTURES / f"{name}.safetensors")
    assert spec == load_spec(FIXTURES / f"{name}.json") and spec["input_shape"] == [1, 8, 8]
    with torch.no_grad():
        out_st = module(torch.from_numpy(x)).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(FIXTURES / f"{name}.pt")).eval()
        out_pt = scripted(torch.from_numpy(x)).detach().numpy()
    session = ort.InferenceSession(str(FIXTURES / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input"
    out_onnx = session.run(None, {"input": x})[0]
    with torch.no_grad():
        out_o2t = convert_onnx(onnx.load(str(FIXTURES / f"{name}.onnx")))(torch.from_numpy(x)).numpy()
    for out in (out_pt, out_onnx, out_o2t):
        np.testing.assert_allclose(out, out_st, atol=ATOL, rtol=0)
    accuracy = float((out_st.argmax(1) == y).mean())
    assert accuracy > 0.85


def test_fixture_onnx_graphs():
    ops = {name: {n.op_type for n in onnx.load(str(FIXTURES / f"{name}.onnx")).graph.node} for name in FIXTURE_NAMES}
    assert "BatchNormalization" in ops["cnn_bn"]  # kept, not folded into Conv
    assert "Add" in ops["resmlp"]
    for name in FIXTURE_NAMES:
        model = onnx.load(str(FIXTURES / f"{name}.onnx"))
        assert model.opset_import[0].version == 17
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis


@pytest.mark.parametrize("make", [everything_spec, conv1d_spec])
def test_built_module_exports_to_onnx(make):
    """Loaders export torch modules with the legacy exporter (opset 17); the spec's modules must
    survive that and compute the same in onnxruntime and back through onnx2torch."""
    from lipverify.load.onnx2torch_compat import convert_onnx

    spec, t = make()
    module = build_module(spec, t)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (rand(2, *spec["input_shape"]),), buffer, dynamo=False, opset_version=17,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    x = rand(3, *spec["input_shape"])
    with torch.no_grad():
        expected = module(x).numpy()
        back = convert_onnx(onnx.load_from_string(buffer.getvalue()))(x).numpy()
    got = ort.InferenceSession(buffer.getvalue()).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(back, expected, atol=ATOL, rtol=0)
