"""One call for a network on numpy arrays, whichever runtime holds it.

A network of the run path is either a torch module (the torch and OpenVINO runtimes) or an
:class:`~SpineNetLib.models.onnx_runtime.OnnxNetwork` (``--runtime onnx``).  The labelling and grading
stages call :func:`network_outputs` and never touch torch themselves, so a run on ONNX Runtime never
imports it.  Nothing here imports torch unless the network is a torch module.
"""
from __future__ import annotations

import numpy as np


def is_torch_module(net) -> bool:
    """Whether ``net`` is a torch module (checked without importing torch)."""
    return any(cls.__module__.startswith("torch.nn") and cls.__name__ == "Module" for cls in type(net).__mro__)


def network_outputs(net, inputs: np.ndarray, device="cpu") -> np.ndarray | tuple[np.ndarray, ...]:
    """``net(inputs)`` as float32 numpy: one array, or a tuple of them for a network with several outputs
    (the grader's heads).  A torch module runs under ``torch.no_grad`` on ``device`` (in eval mode, as the
    checkpoints load it); its bfloat16 outputs come back exactly as float32."""
    if not is_torch_module(net):
        return net(np.ascontiguousarray(inputs, dtype=np.float32))
    import torch

    if net.training:  # Dropout / BatchNorm must run in inference mode; loaded networks already are
        net.eval()
    with torch.no_grad():
        out = net(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)).to(device))
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu().numpy()
    return tuple(t.detach().float().cpu().numpy() for t in out)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, float64 (the labelling's and the grader's
    probabilities, from either runtime's logits)."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
