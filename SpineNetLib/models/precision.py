"""The arithmetic the networks run in: float32 (the default) or bfloat16 autocast (issue 16).

``benchmarks/bench_runtimes.py`` measured bfloat16 autocast at 1.8x the float32 speed for the
official-size detector and 2.5x for the grader on a 2-core CPU with AVX-512 BF16, with outputs
within about 1 % of their range of float32 ones (benchmarks/RESULTS.md); hotspot maps
(``discs/hotspots.py``) are then computed under bfloat16 autocast too, 1.9x faster.  It is a choice, not the default: the
official networks were trained and validated in float32, and only our held-out check
(``benchmarks/validate_bundled.py --precision bf16``) and the tests compare the two.
"""
from __future__ import annotations

import torch

from SpineNetLib.models.grading import reads_one_slice

#: Accepted names, the default first.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


class BFloat16Autocast(torch.nn.Module):
    """Runs ``module`` under ``torch.autocast(bfloat16)`` and hands back float32 outputs.

    Everything else (``config``, ``checkpoint_meta``, ``weights_path``, ...) is read from the
    wrapped module, so code that inspects a loaded network sees the same attributes.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        device = next(self.module.parameters()).device.type
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out = self.module(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(t.float() for t in out)
        return out.float()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)


def bfloat16_is_sound(module: torch.nn.Module) -> bool:
    """Whether ``module`` computes correctly under bfloat16 autocast on a CPU.

    Not a grader that reads a single slice (``GradingConfig.input_slices == 1``, the bundled one):
    with torch 2.13's CPU kernels a bfloat16 ``Conv3d`` over a one-slice input padded in depth is
    wrong by as much as its output (a seeded 3 x 7 x 7 convolution: 0.71 off at outputs of 0.66,
    against 0.004 for inputs of 2-9 slices), and the bundled grader's bfloat16 logits on real discs
    were off by up to 1e20.  Such a grader keeps float32; it is small, so this costs little."""
    return not reads_one_slice(module)


def with_precision(module: torch.nn.Module | None, precision: str) -> torch.nn.Module | None:
    """``module`` as it should run in ``precision`` (:data:`PRECISIONS`); a network for which
    bfloat16 is not sound (:func:`bfloat16_is_sound`) stays float32."""
    if precision not in PRECISIONS:
        from SpineNetLib.core.errors import InputError

        raise InputError(f"unknown precision {precision!r} (use {' or '.join(PRECISIONS)})")
    if module is None or precision == "fp32" or not bfloat16_is_sound(module):
        return module
    return BFloat16Autocast(module).eval()


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CPU on which torch's oneDNN reports bfloat16
    support (CPUs with AVX-512; fastest with AVX-512 BF16 or AMX), a CUDA GPU of compute capability 8
    or later. CPUs with AVX2 only, as most laptops have, emulate it."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


#: Said when bfloat16 is asked for on a CPU that does not compute it natively (:func:`native_bfloat16`):
#: torch then emulates it. Measured on an AMD EPYC with AVX2 and no AVX-512 (benchmarks/RESULTS.md,
#: "Twenty-eighth session"): `spinenet run` on chu_02 with the bundled networks 23-26 s against 3.0-3.6 s.
SLOW_BFLOAT16 = ("bfloat16 was asked for, but this CPU does not compute it natively (torch reports no bfloat16 "
                 "support, as on CPUs without AVX-512), so it runs about 8 times slower than float32 here; "
                 "use --precision fp32 (the default)")


def bfloat16_warning(precision: str, device: torch.device) -> str | None:
    """:data:`SLOW_BFLOAT16` when ``precision`` is "bf16" on a CPU without native bfloat16, else None."""
    return SLOW_BFLOAT16 if precision == "bf16" and device.type == "cpu" and not native_bfloat16(device) else None


def precision_of(module: torch.nn.Module | None) -> str:
    """The arithmetic ``module`` runs in: "bf16" when :func:`with_precision` wrapped it, else "fp32"."""
    return "bf16" if isinstance(module, BFloat16Autocast) else "fp32"
