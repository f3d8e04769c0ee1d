"""The export's settings (the command line sets them: opset, the graphs' dtype, the chunking of the
vocabulary head and of attention, external data, the shared weights file) and dtype helpers."""
import numpy as np
import torch


OPSET = 18
EXTERNAL_DATA = False  # torch writes its own data file when the weights exceed protobuf's 2 GB
DTYPE = "fp32"  # --dtype: the graphs' arithmetic (fp32, or fp16 / bf16 as transformers runs them)
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype():
    return HALF.get(DTYPE, torch.float32)


def np_dtype():
    """The numpy type of the package's activations and cache (bf16 through ml_dtypes)."""
    if DTYPE == "bf16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.float16 if DTYPE == "fp16" else np.float32


def np_of(t):
    """A torch tensor as numpy, bf16 included (as ml_dtypes.bfloat16)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def torch_of(a):
    """numpy → torch, bf16 included."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


FLOAT_TYPES = (1, 10, 16)  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16
WEIGHTS_FILE = "weights.data"
HEAD_CHUNKS = 8  # --head-chunks: the vocabulary head runs over the positions in this many chunks, one after another
ATTENTION_CHUNKS = 8  # --attention-chunks: the log-prob and training graphs' attention runs over the queries in this many chunks


# Tolerances of --verify by the graphs' dtype: |onnx − transformers in the same dtype| of the
# logits and log-probs, and the training graph's against torch autograd (relative gradients;
# `fp32 grads`: a half graph's gradients against fp32 autograd of the same weights).
TOL = {"fp32": {"logits": 1e-4, "logprobs": 1e-4, "grads": 1e-5, "loss": 1e-5, "sum": 1e-6, "fd": 1e-3},
       "fp16": {"logits": 3e-2, "logprobs": 3e-2, "grads": 2e-2, "loss": 1e-3, "sum": 1e-4, "fd": 5e-2,
                "fp32 grads": 5e-2},
       "bf16": {"logits": 2.5e-1, "logprobs": 2.5e-1, "grads": 1e-1, "loss": 1e-2, "sum": 1e-3, "fd": 2e-1,
                "fp32 grads": 2e-1}}


def f32(t):
    """A torch result as fp32 numpy."""
    return t.detach().float().numpy()
# The package's shared weights file (onnx_io.SharedWeights), opened by the command line.
WEIGHTS = None
