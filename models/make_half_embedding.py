"""The tiny package's embedding graph in half precision, as onnxruntime-genai's fp16 folders ship
theirs: the embedding table, the `image_features` input and the `inputs_embeds` output in fp16
(the graph only gathers rows and places the image features, so nothing is computed in fp16).

Run from the repository root: python3 models/make_half_embedding.py  (needs onnx and numpy).
Writes models/tiny-genai-decoder-fp16/embedding.onnx.
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
m = onnx.load(os.path.join(ROOT, "models", "tiny", "embedding.onnx"))
g = m.graph
for i, t in enumerate(g.initializer):
    if t.data_type == TensorProto.FLOAT:
        g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
for v in list(g.input) + list(g.output) + list(g.value_info):
    if v.type.tensor_type.elem_type == TensorProto.FLOAT:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
for n in g.node:
    for a in n.attribute:
        if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
            a.i = TensorProto.FLOAT16
        if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
            a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
onnx.checker.check_model(m)
onnx.save(m, os.path.join(ROOT, "models", "tiny-genai-decoder-fp16", "embedding.onnx"))
