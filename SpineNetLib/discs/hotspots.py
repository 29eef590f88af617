"""Evidence hotspots: where in an IVD volume a grading head finds its evidence.

SpineNet (Jamaludin et al., Medical Image Analysis 2017, §6) shows, for a
disc and a grading, a saliency map over the input volume: the voxels whose
change most affects (or most excites) the class score.  This module computes
such maps for our :class:`~SpineNetLib.models.grading.GradingNet` (official
§3.4) with four methods (:data:`METHODS`):

* ``"gradient"`` -- plain back-propagation (Simonyan et al. 2014): ``|d s_c / d x|``
  with ``s_c`` the class logit (before softmax, so other classes do not leak in).
* ``"guided"`` -- guided back-propagation (Springenberg et al. 2015): as above, but
  every ReLU passes a gradient back only where its forward input was positive
  **and** the incoming gradient is positive.  GradingNet applies its ReLUs
  functionally and in place (``F.relu(..., inplace=True)``), so module hooks
  cannot reach them; the forward pass is re-implemented here
  (:func:`forward_functional`) with a pluggable ReLU.  A test checks that it
  reproduces ``GradingNet.forward`` exactly.
* ``"excitation"`` -- excitation back-propagation (Zhang et al., ECCV 2016):
  the marginal winning probability (MWP) of every unit, propagated top-down
  with ``P(a_j) = sum_i P(a_i) a_j w+_ij / sum_j' a_j' w+_ij'`` (``w+`` = positive
  part of the weights) through convolutions, the linear head and average
  pooling; max pooling passes it to the winning input.  It conserves the
  total probability (1 at the class unit) layer by layer.
* ``"contrastive_excitation"`` (default) -- Zhang's contrastive version: the MWP
  of the target unit minus the MWP of its dual unit (the same unit with negated
  weights, i.e. the evidence *against* the class), keeping the positive part.
  The rules are linear in the top-down signal for fixed activations, so the
  difference is propagated once.

Simplifications of the excitation methods (Zhang's rules assume
conv/linear layers on non-negative activations):

* BatchNorm (an affine map per channel) and ReLU pass the probability through
  unchanged: their gating is already in the activations ``a_j`` of the next rule.
* A residual sum ``relu(r + identity)`` splits the probability between its two
  branches in proportion to their positive parts ``r+`` and ``identity+``.
* Propagation stops at the stem's activation map (after conv1, BN, ReLU:
  ``C x 9 x 56 x 112``); the map is the channel sum, upsampled x2 in-plane to
  the input grid (stem pixel ``i`` is centred on input pixel ``2 i``).  Going
  through conv1 to the image itself would weight the map by the image
  intensity and hide dark lesions (such as endplate defects).

Test-time augmentation: every map is averaged over ``n_augment`` in-plane
shifts of the volume (rows +-8, cols +-16 pixels, zero fill; the shifts of
the official V1 test-time augmentation, official §7) and, for all but the
foraminal (left/right) heads, reversed slice order; each map is shifted back
onto the un-augmented volume before averaging (voxels an augmentation moved
out of view are averaged over the augmentations that saw them).  The first
augmentation is always the identity.  Final maps are non-negative and
scaled to a maximum of 1.

Hotspot boxes (:func:`hotspot_box`, for evaluation against lesion boxes): the
map is smoothed in-plane with a Gaussian of :data:`SMOOTH_PX` volume pixels
(about 1.3 mm; two stem pixels, the resolution of the excitation maps), then
the connected region above half its maximum that holds the maximum gives
the box.  The same smoothing is applied before maps are resampled onto the
scan's coarser grid, so that thin peaks are not lost between grid points.

:func:`hotspot_volume` returns a map aligned with the IVD volume
``(9, 112, 224)`` (:func:`hotspot_volumes`: several heads, sharing the forward passes);
:func:`map_to_grid` resamples it onto the scan's canonical grid or the input's own voxel grid
(through ``IVDVolume.sample_to_canonical``), and :func:`hotspot_maps` gives one map per head on the input's voxel grid
(:class:`HotspotMap`, written by :func:`SpineNetLib.outputs.files.write_results`).

Arithmetic (``precision``, :data:`HOTSPOT_PRECISIONS`): "auto", the default, computes the maps under
bfloat16 autocast on a CPU with native bfloat16 (AVX-512 BF16 / AMX: ``torch.ops.mkldnn.
_is_mkldnn_bf16_supported``) and in the network's own precision elsewhere.  Why: one map of the
official-size grader (1 disc, 1 head, 16 augmentations) took 65.0-67.1 s in float32 and
28.5-30.2 s in bfloat16 on 2 cores of one host, and the smoothed bfloat16 map correlated 0.9999
with the float32 one, with the same hotspot box (benchmarks/RESULTS.md, "Grading with bf16";
issue 16 asks for at most 30 s).  A map is evidence
to look at, not a grade: the grades themselves keep the network's precision (``--precision``).
"fp32" and "bf16" force one.  A grader for which bfloat16 is not sound (one that reads a single
slice, :func:`SpineNetLib.models.precision.bfloat16_is_sound`) always computes its maps in float32.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from SpineNetLib.core.errors import InputError
# the choices of a run and the map's container need no torch (hotspot_options.py); part of this module's API
from SpineNetLib.discs.hotspot_options import (  # noqa: F401
    DEFAULT_METHOD, HOTSPOT_PRECISIONS, LATERAL_HEADS, MAX_SHIFT_RC, METHODS, SMOOTH_PX, HotspotMap,
    check_hotspot_precision, parse_heads, resolve_head,
)
from SpineNetLib.models.grading import GRADING_INPUT_SHAPE, HEADS, GradingHead, GradingNet
from SpineNetLib.models.precision import BFloat16Autocast, bfloat16_is_sound, native_bfloat16

_EPS = 1e-12


def _bn(x: torch.Tensor, bn: torch.nn.BatchNorm3d) -> torch.Tensor:
    """Eval-mode batch norm (running statistics), never in place."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _conv(x: torch.Tensor, conv: torch.nn.Conv3d) -> torch.Tensor:
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding)


def forward_functional(net: GradingNet, x: torch.Tensor, relu: Callable = F.relu,
                       trace: dict | None = None) -> tuple[torch.Tensor, ...]:
    """``net(x)`` in eval mode, written out op by op with ``relu`` for every ReLU and no in-place ops.

    Mirrors :meth:`GradingNet.forward` (official §3.4).  With ``trace`` (a
    dict) it records the activations excitation back-propagation needs.
    """
    stem = relu(_bn(_conv(net.read_slices(x), net.conv1), net.bn1))
    h = net.maxpool(stem)
    blocks = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            x_in = h
            a = relu(_bn(_conv(x_in, block.conv1), block.bn1))
            r = _bn(_conv(a, block.conv2), block.bn2)
            if block.downsample is not None:
                identity = _bn(_conv(x_in, block.downsample[0]), block.downsample[1])
            else:
                identity = x_in
            h = relu(r + identity)
            if trace is not None:
                blocks.append({"block": block, "x": x_in, "a": a, "r": r, "identity": identity})
    feat = torch.flatten(F.adaptive_avg_pool3d(h, 1), 1)
    if trace is not None:
        trace.update(stem=stem, blocks=blocks, top=h, feat=feat)
    return tuple(getattr(net, head.name)(feat) for head in HEADS)


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients where the input was positive."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * ((x > 0) & (grad > 0)).to(grad.dtype)


def _guided_relu(x: torch.Tensor) -> torch.Tensor:
    return _GuidedReLU.apply(x)


# --------------------------------------------------------------------------- saliency per batch


def _gradient_maps(net: GradingNet, x: torch.Tensor, targets: Sequence[tuple[int, int]],
                   guided: bool) -> list[torch.Tensor]:
    """|d logit / d input| for every volume of the batch, ``(N, 9, 112, 224)``, per ``(head index,
    class index)`` target; one forward pass serves them all."""
    x = x.detach().clone().requires_grad_(True)
    maps = []
    with torch.enable_grad():
        logits = forward_functional(net, x, _guided_relu if guided else F.relu)
        for i, (head_index, class_index) in enumerate(targets):
            (g,) = torch.autograd.grad(logits[head_index][:, class_index].sum(), x,
                                       retain_graph=i < len(targets) - 1)
            maps.append(g[:, 0].abs())
    return maps


def _mwp(f_pos: Callable, a: torch.Tensor, p_outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Zhang's rule through a linear map with non-negative weights ``f_pos``: ``a * f_pos^T(p_out / f_pos(a))``
    for each top-down signal of ``p_outs``; ``f_pos(a)`` is computed once for all of them."""
    a = a.detach().requires_grad_(True)
    out = []
    with torch.enable_grad():
        z = f_pos(a)
        for i, p_out in enumerate(p_outs):
            s = torch.where(z > _EPS, p_out / z.clamp_min(_EPS), torch.zeros_like(z))
            (c,) = torch.autograd.grad(z, a, grad_outputs=s, retain_graph=i < len(p_outs) - 1)
            out.append(a.detach() * c)
    return out


def _conv_pos(conv: torch.nn.Conv3d) -> Callable:
    w = conv.weight.detach().clamp(min=0)
    return lambda t: F.conv3d(t, w, None, conv.stride, conv.padding)


def excitation_stem_maps(net: GradingNet, x: torch.Tensor, targets: Sequence[tuple[str | GradingHead, int]],
                         contrastive: bool = True) -> list[torch.Tensor]:
    """(Contrastive) marginal winning probability summed over the stem's channels, ``(N, D, H/2, W/2)``,
    per ``(head, class index)`` target.

    Non-contrastive maps sum to 1 (probability is conserved); contrastive
    ones to 0 (target minus dual).  See the module docstring for the rules.
    The forward pass and the activations' positive sums (``f_pos(a)`` of every
    rule) do not depend on the target, so they are computed once for all targets.
    """
    trace: dict = {}
    with torch.no_grad():
        forward_functional(net, x, F.relu, trace)
    feat = trace["feat"]                                       # (N, C) >= 0

    def top(wv):
        contrib = feat * wv.clamp(min=0)
        return contrib / contrib.sum(dim=1, keepdim=True).clamp_min(_EPS)

    ps = []
    for head, class_index in targets:
        w = getattr(net, resolve_head(head).name).weight.detach()[int(class_index)]   # (C,)
        ps.append(top(w) - top(-w) if contrastive else top(w))
    ps = _mwp(lambda t: F.adaptive_avg_pool3d(t, 1).flatten(1), trace["top"], ps)
    for rec in reversed(trace["blocks"]):
        block = rec["block"]
        rp, ip = rec["r"].clamp(min=0), rec["identity"].clamp(min=0)
        tot = rp + ip
        ok = tot > _EPS
        p_r = [torch.where(ok, p * rp / tot.clamp_min(_EPS), torch.zeros_like(p)) for p in ps]
        p_i = [torch.where(ok, p * ip / tot.clamp_min(_EPS), torch.zeros_like(p)) for p in ps]
        p_a = _mwp(_conv_pos(block.conv2), rec["a"], p_r)        # bn2 passes through
        p_x = _mwp(_conv_pos(block.conv1), rec["x"], p_a)        # relu, bn1 pass through
        if block.downsample is not None:
            p_i = _mwp(_conv_pos(block.downsample[0]), rec["x"], p_i)
        ps = [px + pi for px, pi in zip(p_x, p_i)]
    return [p.sum(dim=1) for p in _mwp(net.maxpool, trace["stem"], ps)]


def excitation_stem_map(net: GradingNet, x: torch.Tensor, head: str | GradingHead, class_index: int,
                        contrastive: bool = True) -> torch.Tensor:
    """:func:`excitation_stem_maps` of one target."""
    return excitation_stem_maps(net, x, [(head, class_index)], contrastive)[0]


def _upsample2(m: torch.Tensor, out_hw) -> torch.Tensor:
    """x2 in-plane linear upsampling where stem pixel i sits on input pixel 2 i."""
    for axis, n_out in ((-2, out_hw[0]), (-1, out_hw[1])):
        n = m.shape[axis]
        idx = torch.arange(n_out, dtype=torch.float64) / 2.0
        lo = idx.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        frac = (idx - lo.to(torch.float64)).to(m.dtype)
        shape = [1] * m.dim()
        shape[axis] = n_out
        frac = frac.reshape(shape)
        m = m.index_select(axis, lo) * (1 - frac) + m.index_select(axis, hi) * frac
    return m


def saliency_batches(net: GradingNet, x: torch.Tensor, targets: Sequence[tuple[str | GradingHead, int]],
                     method: str = DEFAULT_METHOD) -> list[torch.Tensor]:
    """Raw (not augmented, not normalised, possibly signed for the excitation methods) maps ``(N, D, H, W)``,
    one per ``(head, class index)`` target, from one forward pass."""
    if method == "gradient" or method == "guided":
        indexed = [(HEADS.index(resolve_head(h)), int(c)) for h, c in targets]
        return _gradient_maps(net, x, indexed, guided=method == "guided")
    if method in ("excitation", "contrastive_excitation"):
        out = []
        for stem in excitation_stem_maps(net, x, targets, contrastive=method == "contrastive_excitation"):
            maps = _upsample2(stem, x.shape[-2:])
            side = (x.shape[2] - maps.shape[1]) // 2   # slices the network does not read get no evidence
            out.append(F.pad(maps, (0, 0, 0, 0, side, side)) if side else maps)
        return out
    raise InputError(f"unknown hotspot method {method!r}: use one of {', '.join(METHODS)}")


def saliency_batch(net: GradingNet, x: torch.Tensor, head: str | GradingHead, class_index: int,
                   method: str = DEFAULT_METHOD) -> torch.Tensor:
    """:func:`saliency_batches` of one target."""
    return saliency_batches(net, x, [(head, class_index)], method)[0]


# --------------------------------------------------------------------------- augmentation


def augmentations(n_augment: int, seed: int = 0, allow_reverse: bool = True) -> list[tuple[int, int, bool]]:
    """``(row shift, col shift, reverse slices)`` per augmentation; the first is the identity."""
    if int(n_augment) < 1:
        raise InputError(f"the number of hotspot augmentations must be at least 1, got {n_augment}")
    rng = np.random.default_rng(int(seed))
    out = [(0, 0, False)]
    while len(out) < int(n_augment):
        dy = int(rng.integers(-MAX_SHIFT_RC[0], MAX_SHIFT_RC[0] + 1))
        dx = int(rng.integers(-MAX_SHIFT_RC[1], MAX_SHIFT_RC[1] + 1))
        rev = bool(allow_reverse and rng.random() < 0.5)
        out.append((dy, dx, rev))
    return out


def _ranges(shift: int, n: int) -> tuple[slice, slice]:
    """(source, destination) slices of an integer shift with zero fill."""
    if shift >= 0:
        return slice(0, n - shift), slice(shift, n)
    return slice(-shift, n), slice(0, n + shift)


def apply_augmentation(vol: np.ndarray, aug: tuple[int, int, bool]) -> np.ndarray:
    """The volume ``(D, H, W)`` shifted by (dy, dx) in-plane with zero fill, slices reversed if asked."""
    dy, dx, rev = aug
    d, h, w = vol.shape
    out = np.zeros_like(vol)
    sy, ty = _ranges(dy, h)
    sx, tx = _ranges(dx, w)
    out[:, ty, tx] = vol[:, sy, sx]
    return out[::-1].copy() if rev else out


def undo_augmentation(m: np.ndarray, aug: tuple[int, int, bool]) -> tuple[np.ndarray, np.ndarray]:
    """A map made on an augmented volume, back on the original volume, and where it is valid."""
    dy, dx, rev = aug
    if rev:
        m = m[::-1]
    d, h, w = m.shape
    back = np.zeros_like(m)
    valid = np.zeros(m.shape, dtype=bool)
    sy, ty = _ranges(dy, h)
    sx, tx = _ranges(dx, w)
    back[:, sy, sx] = m[:, ty, tx]
    valid[:, sy, sx] = True
    return back, valid


# --------------------------------------------------------------------------- one disc


def _volume_array(ivd_volume) -> np.ndarray:
    vol = getattr(ivd_volume, "volume", ivd_volume)
    vol = np.asarray(vol, dtype=np.float32)
    if vol.shape != GRADING_INPUT_SHAPE:
        raise InputError(f"an IVD volume must have shape {GRADING_INPUT_SHAPE}, got {vol.shape}")
    return vol


def map_arithmetic(net: torch.nn.Module, device: torch.device, precision: str = "auto"):
    """``(network to differentiate, autocast context)`` of the maps for ``precision`` (module docstring)."""
    check_hotspot_precision(precision)
    wrapped_bf16 = isinstance(net, BFloat16Autocast)
    inner = net.module if wrapped_bf16 else net
    bf16 = precision == "bf16" or (precision == "auto" and (wrapped_bf16 or native_bfloat16(device)))
    bf16 = bf16 and bfloat16_is_sound(inner)      # a single-slice grader stays float32 (models/precision.py)
    return inner, (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())


#: Augmented volumes per forward + backward pass.  With the official-size grader, 2 instead of 4
#: takes peak memory from 1.9-2.0 GB to 1.3 GB at the same speed (one map, 16 augmentations, bf16,
#: 2 threads: 26-30 s against 20-28 s, runs interleaved on a shared host; benchmarks/RESULTS.md).
AUGMENTATIONS_PER_PASS = 2


def hotspot_volumes(net: GradingNet, ivd_volume, heads: Sequence[str | GradingHead],
                    class_indices: Sequence[int | None] | None = None, method: str = DEFAULT_METHOD,
                    n_augment: int = 16, seed: int = 0, *, batch_size: int = AUGMENTATIONS_PER_PASS,
                    precision: str = "auto") -> list[np.ndarray]:
    """Evidence maps ``(9, 112, 224)`` float32 in [0, 1] for one disc, one per head, aligned with its IVD volume.

    ``ivd_volume`` is an ``ivd.IVDVolume`` or its ``(9, 112, 224)`` array;
    ``class_indices`` (one per head, or None) None = the class the network predicts for this disc (in
    the network's own precision).  See the module docstring for the methods, the augmentation and
    ``precision``.  Heads augmented alike (all but the foraminal ones, :data:`LATERAL_HEADS`) share
    each augmented volume's forward pass (:func:`saliency_batches`): each map is the one it would be
    alone, and a second head costs about half a map instead of a whole one (benchmarks/RESULTS.md).
    """
    hs = [resolve_head(h) for h in heads]
    if method not in METHODS:
        raise InputError(f"unknown hotspot method {method!r}: use one of {', '.join(METHODS)}")
    classes = list(class_indices) if class_indices is not None else [None] * len(hs)
    if len(classes) != len(hs):
        raise InputError(f"{len(classes)} class indices for {len(hs)} heads")
    vol = _volume_array(ivd_volume)
    was_training = net.training
    grad_flags = [q.requires_grad for q in net.parameters()]
    net.eval()
    for q in net.parameters():      # only input gradients are needed: skip the weight gradients
        q.requires_grad_(False)
    try:
        param = next(net.parameters())
        device, dtype = param.device, param.dtype
        if any(c is None for c in classes):
            with torch.no_grad():
                logits = net(torch.from_numpy(vol)[None, None].to(device, dtype))
            classes = [int(logits[HEADS.index(h)].argmax(dim=1)[0]) if c is None else int(c)
                       for h, c in zip(hs, classes)]
        for h, c in zip(hs, classes):
            if not 0 <= int(c) < h.n_classes:
                raise InputError(f"class {c} does not exist for head {h.name} ({h.n_classes} classes)")
        inner, arithmetic = map_arithmetic(net, device, precision)
        maps: list[np.ndarray | None] = [None] * len(hs)
        for allow_reverse in (True, False):
            group = [i for i, h in enumerate(hs) if (h.name not in LATERAL_HEADS) == allow_reverse]
            if group:
                averaged = _augmented_average(inner, arithmetic, vol, [(hs[i], int(classes[i])) for i in group],
                                              method, augmentations(n_augment, seed, allow_reverse),
                                              device, dtype, batch_size)
                for i, m in zip(group, averaged):
                    maps[i] = m
    finally:
        net.train(was_training)
        for q, flag in zip(net.parameters(), grad_flags):
            q.requires_grad_(flag)
    out = []
    for avg in maps:
        if method in ("excitation", "contrastive_excitation"):
            avg = np.maximum(avg, 0.0)
        peak = float(avg.max())
        out.append((avg / peak if peak > 0 else avg).astype(np.float32))
    return out


def _augmented_average(net: GradingNet, arithmetic, vol: np.ndarray, targets: list[tuple[GradingHead, int]],
                       method: str, augs: list[tuple[int, int, bool]], device, dtype,
                       batch_size: int) -> list[np.ndarray]:
    """Per target, the raw maps of every augmented volume, shifted back onto ``vol`` and averaged
    where the augmentations saw it."""
    totals = [np.zeros(vol.shape, np.float64) for _ in targets]
    count = np.zeros(vol.shape, np.float64)
    step = max(1, int(batch_size))
    for start in range(0, len(augs), step):
        chunk = augs[start:start + step]
        x = torch.from_numpy(np.stack([apply_augmentation(vol, a) for a in chunk]))[:, None].to(device, dtype)
        with arithmetic:
            per_target = saliency_batches(net, x, targets, method)
        for t, maps in enumerate(per_target):
            for m, a in zip(maps.detach().float().cpu().double().numpy(), chunk):
                back, valid = undo_augmentation(m, a)
                totals[t] += back
                if t == 0:
                    count += valid
    return [np.where(count > 0, total / np.maximum(count, 1), 0.0) for total in totals]


def hotspot_volume(net: GradingNet, ivd_volume, head: str | GradingHead, class_index: int | None = None,
                   method: str = DEFAULT_METHOD, n_augment: int = 16, seed: int = 0, *,
                   batch_size: int = AUGMENTATIONS_PER_PASS, precision: str = "auto") -> np.ndarray:
    """:func:`hotspot_volumes` of one head."""
    return hotspot_volumes(net, ivd_volume, [head], [class_index], method, n_augment, seed,
                           batch_size=batch_size, precision=precision)[0]


# --------------------------------------------------------------------------- evaluation helper


def smooth_map(m: np.ndarray, sigma_px: float = SMOOTH_PX) -> np.ndarray:
    """In-plane Gaussian smoothing of a ``(H, W)`` or ``(D, H, W)`` map (never across slices)."""
    m = np.asarray(m, dtype=np.float32)
    if sigma_px <= 0:
        return m
    sigma = (sigma_px, sigma_px) if m.ndim == 2 else (0.0,) * (m.ndim - 2) + (sigma_px, sigma_px)
    return ndimage.gaussian_filter(m, sigma, mode="constant").astype(np.float32)


def hotspot_box(map_2d: np.ndarray, threshold: float = 0.5,
                smooth_px: float = SMOOTH_PX) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)`` pixel box of the hotspot: after in-plane smoothing (:data:`SMOOTH_PX`),
    the connected region above ``threshold * max`` that holds the maximum.

    Pixel centres at integers, so a single pixel ``(x, y)`` gives ``(x-0.5, y-0.5, x+0.5, y+0.5)``.
    None for an empty map.
    """
    m = smooth_map(map_2d, smooth_px).astype(float)
    peak = float(m.max()) if m.size else 0.0
    if peak <= 0:
        return None
    lab, _ = ndimage.label(m >= threshold * peak, structure=np.ones((3, 3), bool))
    k = lab[np.unravel_index(int(np.argmax(m)), m.shape)]
    ys, xs = np.nonzero(lab == k)
    return float(xs.min()) - 0.5, float(ys.min()) - 0.5, float(xs.max()) + 0.5, float(ys.max()) + 0.5


def box_iou(a, b) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------- back to the scan


def map_to_grid(vol_map: np.ndarray, sample_to_canonical: np.ndarray, grid_to_canonical: np.ndarray,
                grid_shape: tuple[int, int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Resample a volume-aligned map onto a voxel grid (inverse sampling, trilinear, 0 outside).

    ``sample_to_canonical`` maps volume ``[slice, row, col, 1]`` to canonical
    ``[row, col, slice, 1]`` (``IVDVolume.sample_to_canonical``);
    ``grid_to_canonical`` maps the grid's ``[a, b, c, 1]`` indices (grid array
    indexed ``[a, b, c]``) to canonical ones: the identity for the canonical
    grid, ``inv(scan.canonical_to_input_ijk)`` for the input's ``[i, j, k]``.
    The result is combined into ``out`` by maximum (several discs overlap).
    """
    vol_map = np.asarray(vol_map, dtype=np.float32)
    grid_shape = tuple(int(n) for n in grid_shape)
    if out is None:
        out = np.zeros(grid_shape, np.float32)
    to_vol = np.linalg.inv(np.asarray(sample_to_canonical, float)) @ np.asarray(grid_to_canonical, float)
    to_grid = np.linalg.inv(to_vol)
    d, h, w = vol_map.shape
    corners = np.array([[s, r, c, 1.0] for s in (-1, d) for r in (-1, h) for c in (-1, w)])
    g = corners @ to_grid.T
    lo = np.maximum(np.floor(g[:, :3].min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(g[:, :3].max(axis=0)).astype(int) + 1, np.array(grid_shape))
    if np.any(hi <= lo):
        return out
    axes = [np.arange(a, b, dtype=float) for a, b in zip(lo, hi)]
    ga, gb, gc = np.meshgrid(*axes, indexing="ij")
    pts = np.stack([ga.ravel(), gb.ravel(), gc.ravel(), np.ones(ga.size)])
    v = to_vol @ pts
    vals = ndimage.map_coordinates(vol_map, v[:3], order=1, mode="constant", cval=0.0, prefilter=False)
    region = out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    np.maximum(region, vals.reshape(ga.shape).astype(np.float32), out=region)
    return out


def canonical_hotspot_map(scan, ivds, maps: Sequence[np.ndarray]) -> np.ndarray:
    """Maps of several discs on the scan's canonical grid ``(H, W, S)`` (maximum where they overlap)."""
    out = np.zeros(scan.shape, np.float32)
    for ivd, m in zip(ivds, maps):
        map_to_grid(m, ivd.sample_to_canonical, np.eye(4), scan.shape, out)
    return out


def input_hotspot_map(scan, ivds, maps: Sequence[np.ndarray]) -> np.ndarray:
    """Maps of several discs on the input's own voxel grid, as a ``[k, j, i]`` array for ``write_image``."""
    grid_to_canonical = np.linalg.inv(np.asarray(scan.canonical_to_input_ijk, float))
    out = np.zeros(tuple(scan.input_shape_ijk), np.float32)          # [i, j, k]
    for ivd, m in zip(ivds, maps):
        map_to_grid(m, ivd.sample_to_canonical, grid_to_canonical, scan.input_shape_ijk, out)
    return np.ascontiguousarray(out.transpose(2, 1, 0))


def hotspot_maps(scan, ivds, grading_net: GradingNet, heads, method: str = DEFAULT_METHOD,
                 n_augment: int = 16, *, class_index: int | None = None, seed: int = 0,
                 progress=None, precision: str = "auto") -> list[HotspotMap]:
    """One map per head, ``hotspots_<Column>.nii.gz``, on the input's voxel grid.

    Every disc's maps (:func:`hotspot_volumes`, all heads at once; class = the predicted one
    unless ``class_index`` is given) are smoothed in-plane (:data:`SMOOTH_PX`,
    which also keeps the resampling from aliasing), scaled to a maximum of 1
    and resampled onto the input grid; where discs overlap the maximum is kept.
    ``heads``: names, columns or :class:`GradingHead` (``"fc_ued,Herniation"`` too).
    """
    head_list = parse_heads(heads)
    if method not in METHODS:
        raise InputError(f"unknown hotspot method {method!r}: use one of {', '.join(METHODS)}")
    maps_per_head: list[list[np.ndarray]] = [[] for _ in head_list]
    columns = ",".join(h.column for h in head_list)
    for done, ivd in enumerate(ivds):   # all heads of a disc at once: they share its forward passes
        if progress is not None:
            progress(done, max(1, len(ivds)), f"hotspots {columns} {getattr(ivd, 'level', '')}")
        volumes = hotspot_volumes(grading_net, ivd, head_list, [class_index] * len(head_list), method, n_augment,
                                  seed, precision=precision)
        for maps, volume in zip(maps_per_head, volumes):
            m = smooth_map(volume)
            maps.append(m / m.max() if m.max() > 0 else m)
    if progress is not None:
        progress(max(1, len(ivds)), max(1, len(ivds)), "hotspots done")
    return [HotspotMap(name=f"hotspots_{h.column}.nii.gz", voxels_kji=input_hotspot_map(scan, ivds, maps),
                       ijk_to_ras=np.asarray(scan.input_ijk_to_ras, float))
            for h, maps in zip(head_list, maps_per_head)]
