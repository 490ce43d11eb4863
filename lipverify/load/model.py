"""Load ONNX, TorchScript, safetensors (+ spec) and Python ``nn.Module`` factories.

Whatever the format, the result is a ``LoadedModel``:
- ``onnx_model``: the network as an ONNX graph, the single input of graph extraction. Torch models
  are exported in memory with torch's TorchScript-based exporter.
- ``reference``: a function computing the model exactly as the user's file does (onnxruntime for
  ONNX files, the torch module itself otherwise), used to check the extracted graph.
- ``torch_module``: a trainable torch module when one exists (fine-tuning).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from lipverify.errors import LipverifyError, UnsupportedModelError, UnsupportedOperationError, UserInputError
from lipverify.load.torch_script import check_script_graph, refuse_custom_symbolics
from lipverify.load.torch_state import is_lipverify_file
from lipverify.load.torch_watch import ForwardWatch

ONNX_SUFFIXES = {".onnx"}
TORCHSCRIPT_SUFFIXES = {".pt", ".pth", ".ts", ".jit", ".torchscript"}
SAFETENSORS_SUFFIXES = {".safetensors"}
EXPORT_OPSET = 17


@dataclass
class LoadedModel:
    path: Path
    format: str  # "onnx" | "torchscript" | "safetensors" | "module"
    sha256: str
    onnx_model: onnx.ModelProto
    reference: Callable[[np.ndarray], np.ndarray]
    input_shape: tuple[int, ...] | None
    torch_module: torch.nn.Module | None = None
    notes: list[str] = field(default_factory=list)
    data_files: dict[str, str] = field(default_factory=dict)  # external data file -> sha256
    spec: dict | None = None
    graph_output: str | None = None  # the ONNX graph output certified (ONNX files; torch modules have one)
    code_modules: tuple[str, ...] = ()  # Python modules whose functions a torch model's forward ran


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None or text == "":
        return None
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").replace("(", "").replace(")", "").split(",") if t.strip())
    except ValueError:
        raise UserInputError(f"--input-shape {text!r} is not a comma-separated list of integers, e.g. 1,28,28")
    if not dims or any(d <= 0 for d in dims):
        raise UserInputError(f"--input-shape {text!r} must have positive dimensions")
    if np.prod(dims) > 50_000_000:
        raise UserInputError(f"--input-shape {text!r} is absurdly large ({int(np.prod(dims))} values per sample)")
    return dims


def check_finite_initializers(model: onnx.ModelProto) -> None:
    for init in model.graph.initializer:
        try:
            arr = numpy_helper.to_array(init)
        except Exception as exc:  # dims/data_type/data length inconsistent: a corrupt file
            raise UserInputError(f"the weight tensor {init.name!r} is corrupt ({type(exc).__name__}: {exc})"
                                 .split("\n")[0]) from exc
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise UserInputError(f"the weights contain NaN or Inf (tensor {init.name!r}); nothing to certify")


# ------------------------------------------------------------------------------------------------
# ONNX
def _fixed_batch(model: onnx.ModelProto) -> int | None:
    inits = {t.name for t in model.graph.initializer}
    dims = [i.type.tensor_type.shape.dim for i in model.graph.input if i.name not in inits]
    return dims[0][0].dim_value if dims and dims[0] and dims[0][0].dim_value else None


def onnx_reference(serialized: bytes, dtype, batched: bool, fixed_batch: int | None,
                   output: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The model as onnxruntime computes it, on a batch: in chunks of a fixed batch size when the file
    declares one, one sample at a time when the graph has no batch axis. ``output``: the graph output
    returned (by name; default the first)."""
    state: dict = {}

    def reference(x: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        if "session" not in state:
            ort.set_default_logger_severity(3)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            state["session"] = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
        s = state["session"]
        name = s.get_inputs()[0].name
        wanted = [output] if output is not None else None
        x = np.asarray(x, dtype=dtype)
        if not batched:
            return np.stack([np.asarray(s.run(wanted, {name: sample})[0]) for sample in x]) if len(x) else \
                np.zeros((0,))
        if fixed_batch is None or len(x) == fixed_batch:
            return s.run(wanted, {name: x})[0]
        outs = []
        for i in range(0, len(x), fixed_batch):
            chunk = x[i:i + fixed_batch]
            pad = fixed_batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            outs.append(s.run(wanted, {name: chunk})[0][: fixed_batch - pad])
        return np.concatenate(outs)

    return reference


def choose_graph_output(path: Path, model: onnx.ModelProto, graph_output: str | None) -> tuple[onnx.ModelProto, str, list[str]]:
    """(the model with only the chosen output, its name, notes). A graph with several outputs is refused
    unless ``--graph-output`` names one: certifying output 0 silently would say nothing about the others."""
    names = list(dict.fromkeys(o.name for o in model.graph.output))  # a name listed twice is one output
    if graph_output is None:
        if len(names) > 1:
            raise UserInputError(f"{path}: the ONNX graph has {len(names)} outputs ({', '.join(map(repr, names))}); "
                                 "lipverify certifies one output tensor: choose it with --graph-output NAME")
        graph_output = names[0]
    elif graph_output not in names:
        raise UserInputError(f"--graph-output {graph_output!r}: the ONNX graph has no such output (its outputs: "
                             f"{', '.join(map(repr, names))})")
    if len(model.graph.output) == 1:
        return model, graph_output, []
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    del pruned.graph.output[:]
    pruned.graph.output.append(next(o for o in model.graph.output if o.name == graph_output))
    notes = [f"only graph output {graph_output!r} is certified (the graph has {len(names)} outputs: "
             f"{', '.join(names)})"] if len(names) > 1 else []
    return pruned, graph_output, notes


def overridable_inputs_note(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that also have an initializer are weights with an overridable default: a runtime may
    feed them. Older exporters (IR < 4, keep_initializers_as_inputs) list every weight this way, so they
    are not refused; the certificate says they are fixed to the file's values."""
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name in inits]
    if not names:
        return []
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    return [f"{len(names)} graph input(s) have a default value in the file and are certified at that value, as "
            f"fixed weights: {shown}; a runtime that feeds other values computes another function"]


def load_onnx(path: Path, input_shape=None, graph_output: str | None = None) -> LoadedModel:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, onnx errors, ...
        raise UserInputError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})".split("\n")[0]) from exc
    if not model.graph.node:
        raise UserInputError(f"{path}: the ONNX graph is empty (not a valid model file)")
    if not model.graph.output:
        raise UserInputError(f"{path}: the ONNX graph declares no output")
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    data_files = {}
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]  # initializers AND attribute tensors
    for tensor in external:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in data_files:
                f = (path.parent / entry.value).resolve()
                if path.parent.resolve() not in f.parents:
                    raise UserInputError(f"{path}: external data file {entry.value!r} lies outside the model's folder")
                if not f.is_file():
                    raise UserInputError(f"{path}: external data file {entry.value!r} is missing; keep the .onnx "
                                         "file and its data file(s) together")
                data_files[entry.value] = sha256_file(f)
    try:
        if external:
            onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise UserInputError(f"{path}: could not read its external data ({type(exc).__name__}: {exc})"
                             .split("\n")[0]) from exc
    if any(uses_external_data(t) for t in _get_all_tensors(model)):
        raise UserInputError(f"{path}: some external data could not be loaded from the model's folder")
    check_finite_initializers(model)
    from lipverify.graph.from_onnx import input_dtype, input_layout

    dtype = input_dtype(model)
    _, batched, _ = input_layout(model, input_shape)
    # the reference runs the whole file as it is and returns the chosen output by name
    chosen_model, chosen, notes = choose_graph_output(path, model, graph_output)
    reference = onnx_reference(model.SerializeToString(), dtype, batched, _fixed_batch(model) if batched else None,
                               chosen)
    return LoadedModel(path, "onnx", sha256_file(path), chosen_model, reference, input_shape,
                       notes=notes + overridable_inputs_note(model), data_files=data_files, graph_output=chosen)


# ------------------------------------------------------------------------------------------------
# torch sources (TorchScript, safetensors + spec, nn.Module factory) -> ONNX in memory
FLOAT32_HALF_ULP = 2.0 ** -24


def softplus_jump_ok(beta: float, threshold: float) -> bool:
    """torch's softplus(x, beta, threshold) switches to the identity when beta x > threshold: a jump of
    log(1 + e^-threshold) / beta there. Accept it only below float32 rounding of the output (threshold / beta)."""
    if not (math.isfinite(beta) and beta > 0 and math.isfinite(threshold)):
        return False
    return math.log1p(math.exp(-threshold)) <= FLOAT32_HALF_ULP * abs(threshold) if threshold > -700 else False


def _graph_nodes(graph):
    for node in graph.nodes():
        yield node
        for block in node.blocks():
            yield from _graph_nodes(block)


def _constant(value):
    node = value.node()
    return node.output().toIValue() if node.kind() == "prim::Constant" else None


def _refuse_tracer_warnings(caught) -> None:
    """The tracer's own warnings (a Python number taken from a traced size or value) refuse the model too;
    the model's code may not silence them (``torch_watch`` refuses code that names the warning filters)."""
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            where = "forward" if is_lipverify_file(w.filename) else f"{Path(w.filename).name}:{w.lineno}"
            raise UnsupportedModelError([UnsupportedOperationError(
                "TracerWarning", where,
                f"the model's forward cannot be traced faithfully ({str(w.message).splitlines()[0]}): data-dependent "
                "Python control flow or values would be frozen at one input; refusing to certify a different "
                "function")])


def _trace(module: torch.nn.Module, example: torch.Tensor, watch: ForwardWatch):
    """The TorchScript graph of the module: its own for TorchScript, else a trace watched like every call."""
    if isinstance(module, torch.jit.ScriptModule):
        return module.inlined_graph
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            traced = watch.run("tracing", lambda x: torch.jit.trace(module, (x,), check_trace=False), example,
                               compare=True)
        except LipverifyError:
            raise
        except Exception as exc:
            raise UserInputError(f"could not trace the model: {type(exc).__name__}: {exc}".split("\n")[0]) from exc
    _refuse_tracer_warnings(caught)
    return traced.inlined_graph


def check_torch_semantics(module: torch.nn.Module, example: torch.Tensor, watch: ForwardWatch | None = None) -> None:
    """Refuse torch models whose ONNX export would compute something else than the module: forward calls
    that are not faithful to trace (``torch_watch``; tracer warnings are errors too) and softplus
    thresholds whose jump is larger than float32 rounding (the exported ONNX Softplus is smooth)."""
    if watch is None:
        watch = ForwardWatch(module)
        with torch.no_grad():
            watch.run("a call of the module", lambda x: module(x), example)
    with torch.no_grad():
        graph = _trace(module, example, watch)
    for node in _graph_nodes(graph):
        if node.kind() == "aten::softplus":
            args = list(node.inputs())
            beta, threshold = (_constant(a) for a in args[1:3])
            if beta is None or threshold is None:
                raise UserInputError("softplus with a non-constant beta/threshold is not supported")
            if not softplus_jump_ok(float(beta), float(threshold)):
                jump = math.log1p(math.exp(-float(threshold))) / float(beta) if float(beta) > 0 else float("nan")
                raise UserInputError(
                    f"softplus(beta={float(beta):g}, threshold={float(threshold):g}) switches to the identity with a "
                    f"jump of {jump:.3g}, more than float32 rounding of its output: the function is not Lipschitz "
                    "(the exported ONNX softplus would hide the jump). Use a threshold of at least 15.")


def torch_to_onnx(module: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """Export a torch module to ONNX, refusing it unless the export computes what the module computes: every
    call lipverify makes of forward (an eager call, the trace, the export) is watched (``torch_watch``).
    Returns the ONNX model and the Python modules whose code forward ran."""
    example = torch.randn((2,) + tuple(input_shape))
    scripted = isinstance(module, torch.jit.ScriptModule)
    if scripted:  # its graph inlines its submodules
        check_script_graph(module, 1 + len(input_shape))
    else:
        for m in _outermost_scripted(module):  # scripted parts of a Python module (their input rank unknown: 0)
            check_script_graph(m, 0)
    warn = torch._C._jit_get_tracer_state_warn()
    torch._C._jit_set_tracer_state_warn(True)  # the model's import may have turned the tracer's warnings off
    try:
        return _export_watched(module, example, scripted)
    finally:
        torch._C._jit_set_tracer_state_warn(warn)


def _outermost_scripted(module: torch.nn.Module) -> list:
    if isinstance(module, torch.jit.ScriptModule):
        return [module]
    return [m for child in module.children() for m in _outermost_scripted(child)]


def _export_watched(module: torch.nn.Module, example: torch.Tensor,
                    scripted: bool) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    input_shape = tuple(example.shape[1:])
    watch = ForwardWatch(module)
    with torch.no_grad():
        try:
            watch.run("a call of the module", lambda x: module(x), example)
        except LipverifyError:
            raise
        except Exception as exc:  # the module's own error on this input shape
            raise UserInputError(f"the model fails on input shape {tuple(input_shape)}: "
                                 f"{type(exc).__name__}: {exc}".split("\n")[0]) from exc
    check_torch_semantics(module, example, watch)
    refuse_custom_symbolics()
    buffer = io.BytesIO()

    def export(x):
        torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=EXPORT_OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})

    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            if scripted:  # TorchScript is exported from its graph, no Python runs
                export(example.clone())
                watch.check_state("the ONNX export")
            else:
                watch.run("the ONNX export", export, example, compare=True)
    except LipverifyError:
        raise
    except Exception as exc:
        raise UserInputError(f"could not trace the model on input shape {tuple(input_shape)}: "
                             f"{type(exc).__name__}: {exc}".split("\n")[0]) from exc
    _refuse_tracer_warnings(caught)
    return onnx.load_from_string(buffer.getvalue()), watch.code_modules()


def _torch_reference(module: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():  # a copy: an in-place first layer must not overwrite the caller's array
            out = module(torch.from_numpy(np.array(x, dtype=np.float32, copy=True)))
        if not isinstance(out, torch.Tensor):
            raise UserInputError(f"the module returns {type(out).__name__}, not one tensor")
        return out.detach().float().numpy()

    return reference


def _guess_input_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    """A dense first layer tells its input size; anything else needs --input-shape."""
    for p in module.parameters():
        return (int(p.shape[1]),) if p.dim() == 2 else None
    return None


def _check_finite_module(module: torch.nn.Module) -> None:
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserInputError(f"the weights contain NaN or Inf (tensor {name!r}); nothing to certify")


def _from_torch(path, fmt, module, input_shape, notes, sha, spec=None) -> LoadedModel:
    module.eval()
    _check_finite_module(module)
    if input_shape is None:
        input_shape = _guess_input_shape(module)
        if input_shape is None:
            raise UserInputError(f"{path}: the input shape is not stored in a {fmt} file; pass --input-shape "
                                 "(per sample, without the batch axis), e.g. --input-shape 1,28,28")
        notes.append(f"input shape {input_shape} inferred from the first weight matrix")
    model, code_modules = torch_to_onnx(module, input_shape)
    return LoadedModel(path, fmt, sha, model, _torch_reference(module), tuple(input_shape), module, notes, spec=spec,
                       code_modules=code_modules)


def load_torchscript(path: Path, input_shape=None) -> LoadedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            hint = ""
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
                if isinstance(obj, dict):
                    hint = " It looks like a state dict: pass --factory package.module:function to build the network."
            except Exception:
                pass
            raise UserInputError(f"{path}: not a TorchScript archive ({type(exc).__name__}).{hint}") from exc
    return _from_torch(path, "torchscript", module, input_shape, [], sha256_file(path))


def load_safetensors(path: Path, input_shape=None, spec_path=None, activation="relu") -> LoadedModel:
    from lipverify.load.spec import load_safetensors_model

    module, spec, notes = load_safetensors_model(path, spec_path=spec_path, activation=activation,
                                                 input_shape=input_shape)
    shape = input_shape or (tuple(spec["input_shape"]) if spec.get("input_shape") else None)
    return _from_torch(path, "safetensors", module, shape, list(notes), sha256_file(path), spec=spec)


def load_module(path: Path, factory: str, input_shape=None) -> LoadedModel:
    """``factory`` is ``package.module:callable`` returning an nn.Module; ``path`` a state dict."""
    if ":" not in factory:
        raise UserInputError(f"--factory {factory!r} must look like package.module:function")
    mod_name, fn_name = factory.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise UserInputError(f"--factory {factory!r}: cannot import ({exc})") from exc
    finally:
        sys.path.pop(0)
    try:
        module = fn()
    except Exception as exc:
        raise UserInputError(f"--factory {factory!r} raised {type(exc).__name__}: {exc}".split("\n")[0]) from exc
    if not isinstance(module, torch.nn.Module):
        raise UserInputError(f"--factory {factory!r} returned {type(module).__name__}, not a torch.nn.Module")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        module.load_state_dict(state)
    except Exception as exc:
        raise UserInputError(f"{path}: could not load the state dict into {factory}: {exc}".split("\n")[0]) from exc
    return _from_torch(path, "module", module, input_shape, [f"built by {factory}"], sha256_file(path))


def load_model(path, input_shape=None, spec_path=None, activation="relu", factory=None,
               graph_output: str | None = None) -> LoadedModel:
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such file")
    if path.is_dir():
        raise UserInputError(f"{path}: is a directory, expected a model file")
    if isinstance(input_shape, str):
        input_shape = parse_shape(input_shape)
    suffix = path.suffix.lower()
    if graph_output is not None and (factory or suffix not in ONNX_SUFFIXES):
        raise UserInputError("--graph-output applies to ONNX files; a torch module must return one output tensor")
    if factory:
        return load_module(path, factory, input_shape)
    if suffix in ONNX_SUFFIXES:
        return load_onnx(path, input_shape, graph_output)
    if suffix in SAFETENSORS_SUFFIXES:
        return load_safetensors(path, input_shape, spec_path, activation)
    if suffix in TORCHSCRIPT_SUFFIXES:
        return load_torchscript(path, input_shape)
    raise UserInputError(f"{path}: unknown model format {suffix!r} (expected .onnx, .safetensors, "
                         ".pt/.ts TorchScript, or a state dict with --factory)")
