"""Start a fine-tune from an exported model: `facemark train --init model.onnx`.

A checkpoint can be lost while its ONNX export ships (the repo keeps only the export). The export holds the whole
network: every convolution with its BatchNorm folded in (weight and bias), int8 weights as DequantizeLinear of
their integers, the PIP vote matrix as a constant, the crop contract and training data in the metadata. This
module turns it back into a checkpoint dict that `train --init` starts from:

- each Conv node (graph order = the network's forward order) gives a torch convolution its weight; a folded
  BatchNorm becomes identity-in-eval (scale sqrt(var + eps), shift = the folded bias), so the eager network
  computes exactly what the export computes (int8 weights at their dequantised values);
- `calibrate_folded_batchnorm` then sets each such BatchNorm's running statistics to the statistics of its input
  on training crops, with scale and shift changed to match: eval output unchanged, and in train mode the batch
  statistics normalise the way the folded network already does, so the first steps do not undo the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from facemark import metadata as meta
from facemark.errors import ModelError
from facemark.metadata import CHECKPOINT_FORMAT
from facemark.train.heads import head_unit
from facemark.train.model import LandmarkNet

FOLDED_BATCHNORM = "folded_batchnorm"  # checkpoint-dict flag: run calibrate_folded_batchnorm before training


def is_onnx(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def graph_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """The graph's constant tensors by name: its initializers and the outputs of its Constant nodes (a traced
    export keeps some constants as nodes; an ORT-optimised one makes them initializers)."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


class _Constants:
    """Values of graph tensors that are constants (graph_constants) or DequantizeLinear of constants."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.init = graph_constants(graph)
        self.producer = {out: node for node in graph.node for out in node.output}

    def value(self, name: str) -> np.ndarray:
        if name in self.init:
            return self.init[name].astype(np.float32)
        node = self.producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            q = self.init[node.input[0]].astype(np.float32)
            scale = self.init[node.input[1]].astype(np.float32)
            zero = self.init[node.input[2]].astype(np.float32) if len(node.input) > 2 else np.zeros_like(scale)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and q.ndim > 1:  # per-channel along `axis`
                shape = [1] * q.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            return (q - zero) * scale
        if node is not None and node.op_type == "Cast":  # fp16 weights cast up (fp16w exports)
            return self.value(node.input[0])
        raise ModelError(f"graph tensor {name!r} is not a constant this reader understands")

    def lookup(self, name: str) -> np.ndarray:
        """`value`, raising KeyError for a tensor that is not constant (what a head's graph reader expects)."""
        try:
            return self.value(name)
        except ModelError as exc:
            raise KeyError(name) from exc


def _module_path(node_name: str) -> str:
    """The module path of an exported node: '/layer2/layer2.0/downsample/downsample.0/Conv' ->
    'layer2.0.downsample.0' (each scope repeats its parent's name; the backbone's own scope is not shown)."""
    comps = [c for c in node_name.split("/") if c][:-1]
    path, prev = "", ""
    for comp in comps:
        path = path[: len(path) - len(prev)] + comp if prev and comp.startswith(prev + ".") else \
            (f"{path}.{comp}" if path else comp)
        prev = comp
    return path


def _graph_module_name(torch_name: str) -> str:
    return torch_name.removeprefix("backbone.")


def _batchnorm_after(model: LandmarkNet, conv_name: str) -> nn.BatchNorm2d | None:
    """The BatchNorm that follows a convolution in the network (`conv1` -> `bn1`, `downsample.0` -> `.1`)."""
    modules = dict(model.named_modules())
    parent, _, leaf = conv_name.rpartition(".")
    candidates = [f"{parent}.{leaf.replace('conv', 'bn')}" if leaf.startswith("conv") else "",
                  f"{parent}.{int(leaf) + 1}" if leaf.isdigit() else ""]
    for name in candidates:
        bn = modules.get(name.lstrip("."))
        if isinstance(bn, nn.BatchNorm2d):
            return bn
    return None


def checkpoint_from_onnx(path: str | os.PathLike) -> dict:
    """A checkpoint dict (as `load_checkpoint` returns) holding the network of an exported facemark model."""
    p = Path(path)
    try:
        model_proto = onnx.load(str(p))
    except Exception as exc:  # noqa: BLE001 -- onnx raises several types for a damaged file
        raise ModelError(f"{p}: not a readable ONNX model ({exc.__class__.__name__})") from None
    props = {m.key: m.value for m in model_proto.metadata_props}
    info = meta.parse_metadata(props, str(p))
    head = props.get(meta.HEAD, "regression")
    graph = model_proto.graph
    consts = _Constants(graph)
    conv_nodes = [n for n in graph.node if n.op_type == "Conv"]
    names = [o.name for o in graph.output]
    config = {"arch": props.get(meta.ARCH, "resnet18"), "in_channels": 1, "num_points": 68,
              "image_size": info.contract.size, "head": head, "presence": meta.FACE_SCORE in names}
    unit = head_unit(head)
    try:
        config.update(unit.options_from_graph(graph, consts.lookup, config["num_points"]))
    except ValueError as exc:
        raise ModelError(f"{p}: {exc}") from None
    from facemark.train.model import build_model

    model = build_model(config)
    convs = {_graph_module_name(n): (n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    by_path = {_module_path(node.name): node for node in conv_nodes}
    if set(by_path) != set(convs):
        raise ModelError(f"{p}: the graph's convolutions {sorted(set(by_path) - set(convs))} and the network's "
                         f"{sorted(set(convs) - set(by_path))} differ")
    with torch.no_grad():
        for path, (name, conv) in convs.items():
            node = by_path[path]
            weight = torch.from_numpy(consts.value(node.input[1]))
            if weight.shape != conv.weight.shape:
                raise ModelError(f"{p}: {name} is {tuple(conv.weight.shape)}, the graph's Conv {node.name} "
                                 f"{tuple(weight.shape)}")
            conv.weight.copy_(weight)
            bias = (torch.from_numpy(consts.value(node.input[2])) if len(node.input) > 2 and node.input[2]
                    else torch.zeros(weight.shape[0]))
            bn = _batchnorm_after(model, name)
            if bn is None:
                conv.bias.copy_(bias)
            else:  # identity in eval: (x - 0) / sqrt(1 - eps + eps) * 1 + bias
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
                bn.weight.fill_(1.0)
                bn.bias.copy_(bias)
        gemms = {_module_path(n.name): n for n in graph.node if n.op_type == "Gemm"}
        for name, linear in model.named_modules():
            if not isinstance(linear, nn.Linear):
                continue
            gemm = gemms.get(_graph_module_name(name))
            if gemm is None:
                raise ModelError(f"{p}: no Gemm node for the network's fully connected layer {name}")
            w = consts.value(gemm.input[1])
            trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
            linear.weight.copy_(torch.from_numpy(w if trans_b else w.T))
            linear.bias.copy_(torch.from_numpy(consts.value(gemm.input[2]).reshape(-1)))
    train_data = info.train_data
    split = info.train_split or {"val_fraction": 0.1, "split_seed": 0}
    train = {"data": train_data, "image_size": config["image_size"], "crop_scale": info.contract.scale,
             "head": head, **unit.train_options(config), "presence": config["presence"], **split}
    val_nme = float(props.get(meta.VAL_NME, "nan"))
    return {"format": CHECKPOINT_FORMAT, "model": config, "contract": info.contract.to_dict(),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "train": train, "metrics": {"val_nme": val_nme}, FOLDED_BATCHNORM: True,
            "source": {"onnx": str(p), "precision": info.precision, "split_known": meta.TRAIN_SPLIT in props}}


@torch.no_grad()
def calibrate_folded_batchnorm(model: LandmarkNet, inputs: torch.Tensor, batch_size: int = 64) -> None:
    """Give every BatchNorm its input's statistics on `inputs` (N, 1, S, S) without changing eval outputs.

    y = w (x - m) / sqrt(v + eps) + b stays the same function when m, v are replaced by the measured mean/var
    and w, b are changed with them; train-mode batch statistics are then close to the running ones."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sums = {bn: [0.0, 0.0, 0] for bn in bns}

    def hook(bn: nn.BatchNorm2d, args, _out) -> None:
        x = args[0].float()
        s = sums[bn]
        s[0] = s[0] + x.sum(dim=(0, 2, 3))
        s[1] = s[1] + (x * x).sum(dim=(0, 2, 3))
        s[2] += x.numel() // x.shape[1]

    handles = [bn.register_forward_hook(hook) for bn in bns]
    model.eval()
    for i in range(0, len(inputs), batch_size):
        model(inputs[i:i + batch_size])
    for h in handles:
        h.remove()
    for bn in bns:
        total, squares, count = sums[bn]
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(1e-6)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # the eval function: scale * x + shift
        shift = bn.bias - scale * bn.running_mean
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(scale * torch.sqrt(var + bn.eps))
        bn.bias.copy_(shift + scale * mean)
