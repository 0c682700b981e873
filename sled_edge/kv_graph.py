"""Rewrite an optimum decoder export so its KV cache is updated in place instead of copied every token.

The exported graph computes, per layer, ``present = Concat(past, new)`` and then ``Transpose(present)`` for
``Q K^T``: every token copies the whole cache two or three times, so a token's cost grows with the context
even where attention itself is cheap. This module replaces each layer's attention core (the two MatMuls,
the mask and the softmax between them) with onnxruntime's ``GroupQueryAttention`` contrib operator, whose
past and present key/value may be one buffer ``[1, H_kv, capacity, D]``: bound to the same ``OrtValue``
with IOBinding, a step writes only its new positions and attends over the first ``total_length`` ones.

Inputs added: ``sled_seqlens_k`` ``[1]`` int32 (total length - 1) and ``sled_total_length`` (scalar int32).
Grouped-query exports (Llama, Qwen2 with fewer key/value heads than query heads) repeat each key/value head
before ``Q K^T`` (Unsqueeze, Expand, Reshape); GroupQueryAttention reads the shared heads as they are, so the
repeat goes too. Projections, rotary embeddings and everything else stay as exported; ``attention_mask`` becomes unused
(batch 1, no padding: GQA's causal mask is the same mask). Anything the rewrite does not recognise raises
``UnsupportedGraph`` and the caller keeps the exported graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["UnsupportedGraph", "SEQLENS_INPUT", "TOTAL_LENGTH_INPUT", "in_place_kv_graph"]

SEQLENS_INPUT = "sled_seqlens_k"
TOTAL_LENGTH_INPUT = "sled_total_length"
_SCALE_OPS = ("Mul", "Div")


class UnsupportedGraph(ValueError):
    """The export's attention is not the pattern this rewrite knows; keep the graph as exported."""


class _Graph:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.missing: set[str] = set()

    def only(self, name: str, op_types: tuple[str, ...]) -> onnx.NodeProto:
        """The single consumer of ``name`` among ``op_types`` (others, such as Shape, are ignored)."""
        found = [node for node in self.consumers.get(name, []) if node.op_type in op_types]
        if len(found) != 1:
            raise UnsupportedGraph(f"{name}: expected one {'/'.join(op_types)} consumer, found {len(found)}")
        return found[0]

    def scalar(self, node: onnx.NodeProto, other_than: str) -> float:
        """The constant scalar operand of a Mul/Div whose other operand is ``other_than``."""
        operand = node.input[1] if node.input[0] == other_than else node.input[0]
        value = self.constants.get(operand)
        if value is None:  # computed from static shapes (e.g. sqrt(head_dim)): evaluated by one probe run
            self.missing.add(operand)
            return float("nan")
        if value.size != 1:
            raise UnsupportedGraph(f"{node.name}: scale {operand!r} is not a scalar")
        return float(value.reshape(()))


def _past_repeat_kv(g: _Graph, present: str) -> str:
    """``present`` as attention reads it: past the grouped-query ``repeat_kv`` (Unsqueeze, Expand,
    Reshape: each key/value head copied for its query heads) when the export has one. GroupQueryAttention
    reads the ``kv_num_heads`` heads as they are, so the copies go with the rest of the old core."""
    readers = [node for node in g.consumers.get(present, []) if node.op_type != "Shape"]
    if len(readers) != 1 or readers[0].op_type != "Unsqueeze":
        return present
    expand = g.only(readers[0].output[0], ("Expand",))
    return g.only(expand.output[0], ("Reshape",)).output[0]


def _attention_core(g: _Graph, key_present: str, value_present: str) -> tuple[str, float, str]:
    """From one layer's presents: the query as it enters ``Q K^T``, the scale applied to the product
    (constant factors on K^T and on the scores), and the attention output ``[B, H, S, D]``."""
    key_present, value_present = _past_repeat_kv(g, key_present), _past_repeat_kv(g, value_present)
    transpose = g.only(key_present, ("Transpose",))
    if list(next(a for a in transpose.attribute if a.name == "perm").ints) != [0, 1, 3, 2]:
        raise UnsupportedGraph(f"{transpose.name}: not K^T")
    scale, tensor = 1.0, transpose.output[0]
    node = g.only(tensor, ("MatMul", *_SCALE_OPS))
    while node.op_type in _SCALE_OPS:  # K^T scaled before the product (the SDPA export scales both sides)
        factor = g.scalar(node, tensor)
        scale, tensor = scale * (factor if node.op_type == "Mul" else 1.0 / factor), node.output[0]
        node = g.only(tensor, ("MatMul", *_SCALE_OPS))
    scores = node
    if scores.input[1] != tensor:
        raise UnsupportedGraph(f"{scores.name}: K^T is not the right operand")
    tensor = scores.output[0]
    node = g.only(tensor, (*_SCALE_OPS, "Add", "Where", "Softmax"))
    while node.op_type in _SCALE_OPS:
        factor = g.scalar(node, tensor)
        scale, tensor = scale * (factor if node.op_type == "Mul" else 1.0 / factor), node.output[0]
        node = g.only(tensor, (*_SCALE_OPS, "Add", "Where", "Softmax"))
    product = g.only(value_present, ("MatMul",))
    if product.input[1] != value_present:
        raise UnsupportedGraph(f"{product.name}: V is not the right operand")
    return scores.input[0], scale, product.output[0]


def in_place_kv_graph(model: onnx.ModelProto, query_heads: int) -> onnx.ModelProto:
    """A copy of ``model`` whose every layer attends with GroupQueryAttention over shared KV buffers;
    ``query_heads`` is the model's attention heads (key/value heads are read from the past's shape)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    g = _Graph(graph)
    outputs = {out.name: out for out in graph.output}
    inputs = {inp.name: inp for inp in graph.input}
    layers = sorted({int(name.split(".")[1]) for name in inputs if name.startswith("past_key_values.")})
    if not layers:
        raise UnsupportedGraph("no past_key_values inputs")
    cores = [_attention_core(g, f"present.{layer}.key", f"present.{layer}.value") for layer in layers]
    if g.missing:
        g.constants.update(_probe(model, sorted(g.missing)))
        g.missing.clear()
        cores = [_attention_core(g, f"present.{layer}.key", f"present.{layer}.value") for layer in layers]
    new_nodes: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}  # attention output of the old core -> the same tensor from GQA
    for layer, (query, scale, attention_out) in zip(layers, cores):
        names = {kind: (f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}") for kind in ("key", "value")}
        concat = {}
        for kind, (past, present) in names.items():
            node = g.producer.get(present)
            if node is None or node.op_type != "Concat" or list(node.input[:1]) != [past] or len(node.input) != 2:
                raise UnsupportedGraph(f"{present} is not Concat({past}, new)")
            concat[kind] = node.input[1]
        past_shape = inputs[names["key"][0]].type.tensor_type.shape.dim
        kv_heads, head_dim = past_shape[1].dim_value, past_shape[3].dim_value
        prefix = f"/sled/layers.{layer}"

        def to_bsh(name: str, tag: str) -> str:  # [B, H, S, D] -> [B, S, H*D]: only the new positions move
            new_nodes.append(helper.make_node("Transpose", [name], [f"{prefix}/{tag}_bshd"], perm=[0, 2, 1, 3]))
            new_nodes.append(helper.make_node("Reshape", [f"{prefix}/{tag}_bshd", _shape_constant(graph, [0, 0, -1])],
                                              [f"{prefix}/{tag}_bsh"]))
            return f"{prefix}/{tag}_bsh"

        q, k, v = to_bsh(query, "q"), to_bsh(concat["key"], "k"), to_bsh(concat["value"], "v")
        new_nodes.append(helper.make_node(
            "GroupQueryAttention",
            [q, k, v, names["key"][0], names["value"][0], SEQLENS_INPUT, TOTAL_LENGTH_INPUT],
            [f"{prefix}/attn_bsh", names["key"][1], names["value"][1]],
            domain="com.microsoft", num_heads=query_heads, kv_num_heads=kv_heads, scale=scale,
            name=f"{prefix}/GroupQueryAttention",
        ))
        new_nodes.append(helper.make_node("Reshape", [f"{prefix}/attn_bsh", _shape_constant(graph, [0, 0, query_heads, head_dim])],
                                          [f"{prefix}/attn_bshd"]))
        new_nodes.append(helper.make_node("Transpose", [f"{prefix}/attn_bshd"], [f"{prefix}/attn_bhsd"],
                                          perm=[0, 2, 1, 3]))
        rename[attention_out] = f"{prefix}/attn_bhsd"
        for kind in ("key", "value"):  # present has the buffer's capacity, not past + new
            dims = outputs[names[kind][1]].type.tensor_type.shape.dim
            dims[2].ClearField("dim_value")
            dims[2].dim_param = "kv_capacity"
            inputs[names[kind][0]].type.tensor_type.shape.dim[2].dim_param = "kv_capacity"
    for node in graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
    for node in new_nodes:
        graph.node.append(node)
    graph.input.append(helper.make_tensor_value_info(SEQLENS_INPUT, onnx.TensorProto.INT32, [1]))
    graph.input.append(helper.make_tensor_value_info(TOTAL_LENGTH_INPUT, onnx.TensorProto.INT32, []))
    _prune(graph)
    used = {name for node in graph.node for name in node.input}
    for name in inputs:
        if name.startswith("past_key_values.") and any(
            name in node.input and node.op_type != "GroupQueryAttention" for node in graph.node
        ):
            raise UnsupportedGraph(f"{name} is still read outside attention (its length would be the capacity)")
    for inp in list(graph.input):
        if inp.name not in used:
            graph.input.remove(inp)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _probe(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Values of intermediate tensors that depend only on static shapes: one run of the original graph
    on one token after one cached position."""
    import onnxruntime as ort

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
    feeds = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((1, inp.shape[1], 1, inp.shape[3]), dtypes[inp.type])
        else:  # input_ids, position_ids [1, 1]; attention_mask [1, 2]
            feeds[inp.name] = np.ones((1, 2 if inp.name == "attention_mask" else 1), np.int64)
    values = session.run(names, feeds)
    for name, value in zip(names, values):
        if np.asarray(value).size != 1:
            raise UnsupportedGraph(f"scale {name!r} is not a scalar")
    return dict(zip(names, values))


def _shape_constant(graph: onnx.GraphProto, shape: list[int]) -> str:
    """An initializer holding ``shape`` for a Reshape (0: keep that dimension)."""
    name = "/sled/shape_" + "_".join(str(d) for d in shape).replace("-", "m")
    if not any(init.name == name for init in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), name))
    return name


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes no graph output depends on (the old mask, softmax and concat paths)."""
    producer = {out: node for node in graph.node for out in node.output}
    live: set[int] = set()
    stack = [out.name for out in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        stack.extend(node.input)
    kept = [node for node in graph.node if id(node) in live]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in kept for name in node.input}
    kept_init = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)
