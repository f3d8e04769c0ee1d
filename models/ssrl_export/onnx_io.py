"""Graph export: torch → ONNX with readable dimension names and optional inputs, every weight stored
once in the package's shared file and read in place, joint forward + backward graphs, sessions."""
import os
import time

import numpy as np
import torch
import torch.nn as nn

from . import settings
from .settings import FLOAT_TYPES, WEIGHTS_FILE, np_dtype, np_of


class SharedWeights:
    """Every graph of a package reads its weights from one file, `weights.data`, and a weight
    used by several graphs is stored there once, in one layout, under its Hugging Face name: the
    runtime maps the file once and hands the same tensors to every session (ONNX Runtime's
    shared initializers), so a process holds one copy of the weights whatever graphs it opens.

    torch's export gives each graph its own names and sometimes its own layout for a weight (a
    pre-transposed constant in one graph, a Transpose node over the parameter in another). Each
    initializer is matched to the model's parameter by content, in either layout, and renamed
    after it; the language model's matrices are stored in the layout the inference graphs use,
    [in, out] (named `….weight.T`), the input embedding (also the tied `lm_head`) and the vision
    tower's as torch holds them. A use of the other layout is rewritten to read the stored one:
    Transpose(W) becomes the stored tensor, MatMul(x, W) a FusedMatMul with transB, Gemm and
    FusedMatMul flip their transpose flag. Tensors that match no parameter (torch's constants)
    are stored once per distinct content."""

    def __init__(self, out, model):
        import hashlib
        self.sha = lambda b: hashlib.sha1(b.view(np.uint8) if isinstance(b, np.ndarray) else b).digest()
        self.path = os.path.join(out, WEIGHTS_FILE)
        if os.path.exists(self.path):
            os.remove(self.path)
        self.at, self.stored = 0, {}
        self.params, self.want = {}, {}
        embed = model.get_input_embeddings().weight
        for name, p in model.named_parameters(remove_duplicate=False):
            a = np_of(p)
            if a.size < 256 or a.dtype != np_dtype() and a.dtype != np.float32:
                continue
            self.params.setdefault((a.shape, self.sha(a)), (name, "N"))
            if a.ndim == 2:
                self.params.setdefault((a.shape[::-1], self.sha(np.ascontiguousarray(a.T))), (name, "T"))
            text = ".visual." not in f".{name}" and p is not embed
            self.want.setdefault(name, "T" if text and a.ndim == 2 else "N")
        self.kept = 0

    @staticmethod
    def _raw(init):
        from onnx import numpy_helper
        return init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()

    def canonicalise(self, m, text):
        """Renames the initializers that are parameters and, in the text graphs (`text`), stores
        each in its package layout, rewriting the uses of the other one. Returns (renamed,
        rewritten uses)."""
        import onnx
        from onnx import numpy_helper

        inputs = {i.name for i in m.graph.input}
        uses = {}
        for n in m.graph.node:
            for k, i in enumerate(n.input):
                uses.setdefault(i, []).append((n, k))
        present = {i.name for i in m.graph.initializer}
        alias, drop_nodes, replace = {}, set(), {}
        renamed = flipped = 0

        def can_flip(n, k):
            perm = next((a for a in n.attribute if a.name == "perm"), None)
            return ((n.op_type == "Transpose" and (perm is None or list(perm.ints) == [1, 0]))
                    or reads_transposed(n, k))

        def flip(n, k, y):
            if n.op_type == "Transpose":
                alias[n.output[0]] = y
                drop_nodes.add(id(n))
            else:
                replace[id(n)] = read_transposed(n, k, y)

        keep = []
        for init in m.graph.initializer:
            if init.name in inputs or init.data_type not in FLOAT_TYPES:
                keep.append(init)
                continue
            raw, old = self._raw(init), init.name
            hit = self.params.get((tuple(init.dims), self.sha(raw)))
            if hit is None:
                keep.append(init)
                continue
            name, layout = hit
            want = self.want[name]
            mine = uses.get(init.name, [])
            if text and layout != want and mine and all(can_flip(n, k) for n, k in mine):
                arr = np.ascontiguousarray(numpy_helper.to_array(init).T)
                target = name + (".T" if want == "T" else "")
                for n, k in mine:
                    flip(n, k, target)
                flipped += len(mine)
                new = numpy_helper.from_array(arr, target)
            else:
                if text and layout != want:
                    self.kept += 1
                target = name + (".T" if layout == "T" else "")
                for n, k in mine:
                    n.input[k] = target
                new = init
                new.name = target
            renamed += 1
            if target in present and target != old:
                continue  # the same weight twice in one graph: the first one serves
            present.add(target)
            keep.append(new)
        nodes = []
        for n in m.graph.node:
            if id(n) in drop_nodes:
                continue
            n = replace.get(id(n), n)
            n.input[:] = [alias.get(i, i) for i in n.input]
            nodes.append(n)
        for o in m.graph.output:
            if o.name in alias:
                raise SystemExit(f"export: graph output {o.name} is a transposed weight")
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
        del m.graph.node[:]
        m.graph.node.extend(nodes)
        if flipped:
            use_ms_domain(m)
        return renamed, flipped

    def save(self, m, path):
        """Writes the graph to `path` with every initializer of at least 1 KiB in the shared
        file (4 KiB-aligned, so ONNX Runtime and the runtime can map it), each distinct tensor
        once."""
        import onnx
        with open(self.path, "ab") as f:
            for init in m.graph.initializer:
                raw = self._raw(init)
                if len(raw) < 1024:
                    continue
                key = (init.data_type, tuple(init.dims), self.sha(raw))
                if key not in self.stored:
                    pad = (4096 - self.at % 4096) % 4096
                    f.write(b"\0" * pad)
                    f.write(raw)
                    self.stored[key] = (self.at + pad, len(raw))
                    self.at += pad + len(raw)
                off, n = self.stored[key]
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                    init.ClearField(field)
                del init.external_data[:]
                init.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(off)), ("length", str(n))):
                    e = init.external_data.add()
                    e.key, e.value = k, v
        onnx.save(m, path)


def reads_transposed(n, k):
    """Whether node `n` can read its input `k` as the transpose of another tensor
    (read_transposed)."""
    return ((n.op_type == "MatMul" and k == 1)
            or (n.op_type in ("Gemm", "FusedMatMul") and k in (0, 1) and n.domain in ("", "com.microsoft")))


def read_transposed(n, k, y):
    """`n` reading its input `k` as the transpose of `y`: MatMul(x, ·) becomes
    com.microsoft.FusedMatMul(x, y, transB=1), Gemm and FusedMatMul flip transA / transB. Returns
    the node to keep in `n`'s place."""
    from onnx import helper

    if n.op_type == "MatMul":
        return helper.make_node("FusedMatMul", [n.input[0], y], list(n.output), name=n.name,
                                domain="com.microsoft", alpha=1.0, transA=0, transB=1)
    key = "transB" if k == 1 else "transA"
    a = next((a for a in n.attribute if a.name == key), None)
    if a is None:
        n.attribute.append(helper.make_attribute(key, 1))
    else:
        a.i = 1 - a.i
    n.input[k] = y
    return n


def use_ms_domain(m):
    """Imports ONNX Runtime's com.microsoft domain (FusedMatMul) unless the model does."""
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def use_weights_in_place(m):
    """Each 2-D weight used where it is stored: MatMul(x, Transpose(W)) becomes
    com.microsoft.FusedMatMul(x, W, transB=1), Gemm(x, Transpose(W)) flips its transB, and
    Transpose(Transpose(W)) is W. The training graph's forward, recomputation and backward read
    one copy of each weight, where ONNX Runtime would otherwise keep a transposed copy beside it
    (constant folding) or transpose it on every call. Returns the number of uses rewritten."""
    # Weights only: an initializer that is also a graph input (an optional input's default, such
    # as a LoRA factor) is the caller's to replace and keeps its form.
    inputs = {i.name for i in m.graph.input}
    inits = {i.name: i for i in m.graph.initializer if i.name not in inputs}
    trans = {}  # Transpose output → the 2-D initializer it transposes
    for n in m.graph.node:
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        if n.op_type == "Transpose" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2 \
                and perm in (None, [1, 0]):
            trans[n.output[0]] = n.input[0]
    twice = {}  # Transpose(Transpose(W)) output → W
    for n in m.graph.node:
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        if n.op_type == "Transpose" and n.input[0] in trans and perm in (None, [1, 0]):
            twice[n.output[0]] = trans[n.input[0]]
    rewritten, nodes = 0, []
    for n in m.graph.node:
        if n.output[0] in twice:
            continue
        n.input[:] = [twice.get(i, i) for i in n.input]
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in trans:
            n = read_transposed(n, 1, trans[n.input[1]])
            rewritten += 1
        nodes.append(n)
    used = {i for n in nodes for i in n.input}
    nodes = [n for n in nodes if not (n.op_type == "Transpose" and n.output[0] in trans and n.output[0] not in used)]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    if rewritten:
        use_ms_domain(m)
    return rewritten


def export(mod, args, path, input_names, output_names, dynamic_shapes, dim_names, defaults=None,
           split_slices=True):
    """torch.onnx (dynamo) export, then: readable dimension names, debug metadata stripped, and
    `defaults` {input: array} stored as initializers of the same name, which makes those inputs
    optional (ONNX Runtime uses the stored value unless the caller feeds one).

    `split_slices=False` leaves out onnxscript's SlicesSplit rewrite (two Slices of a tensor
    into one Split): it matches by trying every node of the graph against every Slice, which
    took most of the training graph's export time (quadratic in its nodes: 11 of 14 minutes
    for the 2-layer tiny package's, with attention and head in chunks)."""
    import onnx
    from onnx import numpy_helper
    from onnxscript import rewriter

    t0 = time.time()
    rules = rewriter._DEFAULT_REWRITE_RULES
    if not split_slices:
        rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if r.name != "SlicesSplit")
    try:
        torch.onnx.export(mod, args, path, input_names=input_names, output_names=output_names,
                          dynamic_shapes=dynamic_shapes, opset_version=settings.OPSET, dynamo=True,
                          external_data=settings.EXTERNAL_DATA, optimize=True, verbose=False)
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules
    m = onnx.load(path, load_external_data=False)
    # Drop the exporter's per-node debug metadata (stack traces with local paths and line
    # numbers): smaller files that depend only on the model.
    for n in m.graph.node:
        del n.metadata_props[:]
    for vi in m.graph.value_info:
        del vi.metadata_props[:]
    for vi in list(m.graph.input) + list(m.graph.output):
        for ax, nm in dim_names.get(vi.name, {}).items():
            dim = vi.type.tensor_type.shape.dim[ax]
            dim.Clear()
            dim.dim_param = nm
    for name, value in (defaults or {}).items():
        m.graph.initializer.append(numpy_helper.from_array(value, name))
    half = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}.get(settings.DTYPE)
    if half is not None:
        # (the half types of the graph's inputs and outputs, as the contract expects them)
        for vi in list(m.graph.input) + list(m.graph.output):
            t = vi.type.tensor_type.elem_type
            if t in FLOAT_TYPES and t != onnx.TensorProto.FLOAT and t != half:
                raise SystemExit(f"export: {os.path.basename(path)} {vi.name} is of type {t}, not the package's")
    torch_data = path + ".data"
    if os.path.exists(torch_data):
        # torch's own data file beside the graph: read in, rewritten into the shared file.
        from onnx.external_data_helper import load_external_data_for_model
        load_external_data_for_model(m, os.path.dirname(os.path.abspath(path)))
    # (the vision tower's backward, vision_grad.onnx, reads its weights in place as the
    # training graphs do: one copy each, shared with vision.onnx)
    text = not path.endswith("vision.onnx")
    renamed, flipped = settings.WEIGHTS.canonicalise(m, text)
    in_place = use_weights_in_place(m) if text else 0
    print(f"  {os.path.basename(path)}: {renamed} weights by their model names, {flipped + in_place} uses "
          f"read in the stored layout", flush=True)
    settings.WEIGHTS.save(m, path)
    if os.path.exists(torch_data):
        os.remove(torch_data)
    ops = sorted({n.domain or "ai.onnx" for n in m.graph.node})
    print(f"  {os.path.basename(path)}: {os.path.getsize(path) / 1e6:.2f} MB (weights in {WEIGHTS_FILE}), "
          f"{len(m.graph.node)} nodes, "
          f"domains {ops}, {time.time() - t0:.1f} s", flush=True)


def empty_cache(name, rows, kvh, hd, L):
    """`{name}.{i}.key/value` for every layer: `rows` rows with no tokens, as decoder inputs."""
    return {f"{name}.{i}.{kv}": np.zeros((rows, kvh, 0, hd), np_dtype()) for i in range(L) for kv in ("key", "value")}


def prefix_defaults(L, kvh, hd):
    """No shared prompt cache: one empty prompt, every row on its slot 0. With these the decoder is a
    plain past/present decoder (onnxruntime-genai and the trainer's full-sequence checks feed no prefix)."""
    out = empty_cache("prefix_key_values", 1, kvh, hd, L)
    out.update({"prefix_mask": np.zeros((1, 0), np.int64), "slot_rows": np.zeros(1, np.int64),
                "row_slots": np.zeros(0, np.int64)})
    return out


def own_defaults(L, kvh, hd):
    """No own-cache buffer: the rows' own tokens are all in past (a plain past/present decoder)."""
    out = empty_cache("own_key_values", 1, kvh, hd, L)
    out["own_mask"] = np.zeros((1, 0), np.int64)
    return out


def export_joint(fn, example, path, in_names, out_names, ds, dims):
    """A forward + backward step function traced with make_fx into core ATen ops (its autograd
    calls become plain operations) and exported as one graph."""
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    t0 = time.time()
    gm = make_fx(fn, decomposition_table=core_aten_decompositions(), tracing_mode="symbolic",
                 _allow_non_fake_inputs=True)(*example)
    print(f"  {os.path.basename(path)} step traced: {len(gm.graph.nodes)} nodes in {time.time() - t0:.1f} s",
          flush=True)

    class Joint(nn.Module):
        def __init__(self, gm):
            super().__init__()
            self.gm = gm

        def forward(self, *args):
            return self.gm(*args)

    export(Joint(gm).eval(), tuple(example), path, in_names, out_names, (tuple(ds),), dims, split_slices=False)


def providers():
    """CUDA where onnxruntime has it (bf16 graphs need it), else the CPU."""
    import onnxruntime as ort
    if settings.DTYPE == "bf16":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit("verify: bf16 graphs need onnxruntime-gpu (ONNX Runtime's CPU provider has no bf16 "
                             "kernels); export without --verify here and verify on a GPU")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Typed:
    """An ONNX Runtime session fed and read as fp32 numpy whatever its floating-point types: a
    half-precision package's activations and cache are converted at the graph's edges, as the
    runtime does (half → fp32 → half is exact)."""

    def __init__(self, path, so):
        import onnxruntime as ort
        self.s = ort.InferenceSession(path, so, providers=providers())
        self.types = {i.name: i.type for i in list(self.s.get_inputs()) + list(self.s.get_overridable_initializers())}

    def run(self, names, feeds):
        conv = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np_dtype()}
        f = {k: (v.astype(conv[self.types[k]]) if self.types.get(k) in conv and v.dtype != conv[self.types[k]]
                 else v) for k, v in feeds.items()}
        return [o.astype(np.float32) if o.dtype in (np.float16, np_dtype()) else o for o in self.s.run(names, f)]
