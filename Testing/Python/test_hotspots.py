"""Evidence hotspots (SpineNet 2017 §6): saliency methods, augmentation, mapping back to the scan.

The demonstration uses a small grader trained on phantom discs whose only
signal is an endplate notch (Testing/Data/grader_notch/, see its README for
the exact command): on a phantom it never saw, the hotspot of the positive
"lower endplate defect" class must overlap the notch's ground-truth box.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from SpineNetLib.weights import checkpoints
from SpineNetLib.discs import hotspots as hs
from SpineNetLib.discs import extraction as ivd
from SpineNetLib.synthetic import phantom
from SpineNetLib.core.errors import InputError
from SpineNetLib.models.grading import HEADS, GradingConfig, GradingNet
from SpineNetLib.models.precision import native_bfloat16
from SpineNetLib.outputs.files import write_hotspot_maps
from SpineNetLib.training.grader import phantom_vertebrae

FIXTURE = Path(__file__).resolve().parents[1] / "Data" / "grader_notch" / "grading.pt"
#: Threshold of the hotspot (fraction of its maximum) and the IoU the 2017 paper's Table 3 range supports.
THRESHOLD = 0.5
MIN_IOU = 0.3


def _random_net(seed=0, width=4):
    torch.manual_seed(seed)
    net = GradingNet(GradingConfig((1, 1, 1, 1), width))
    for m in net.modules():   # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.3)
    return net.eval()


def test_functional_forward_is_the_network():
    net = _random_net(width=4)
    assert net.layer3[0].downsample is not None        # the downsample branch is exercised
    x = torch.rand(2, 1, 9, 112, 224)
    with torch.no_grad():
        a, b = net(x), hs.forward_functional(net, x)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_guided_relu_gates_on_input_and_gradient():
    x = torch.tensor([-1.0, 2.0, 3.0, -4.0], requires_grad=True)
    y = hs._GuidedReLU.apply(x)
    y.backward(torch.tensor([1.0, 1.0, -1.0, -1.0]))
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0, 3.0, 0.0]))
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # on the network: guided maps differ from plain gradients, both are finite and non-negative
    net = _random_net(1)
    x = torch.rand(1, 1, 5, 56, 112)      # the network is fully convolutional: small inputs keep this fast
    g = hs.saliency_batch(net, x, "fc_led", 1, "gradient")
    gb = hs.saliency_batch(net, x, "fc_led", 1, "guided")
    assert g.shape == gb.shape == (1, 5, 56, 112) and float(g.min()) >= 0 and float(gb.min()) >= 0
    assert not torch.allclose(g, gb)


def test_excitation_conserves_probability():
    """Zhang's MWP sums to 1 at every layer (here: the stem); the contrastive difference sums to 0."""
    net = _random_net(2)
    x = torch.rand(2, 1, 5, 56, 112)
    # Zhang's rule on a linear map: P_j = a_j w+_j / sum a w+
    w = torch.tensor([[1.0, -1.0, 2.0]])
    p, half = hs._mwp(lambda t: t @ w.clamp(min=0).T, torch.tensor([[1.0, 5.0, 2.0]]),
                      [torch.tensor([[1.0]]), torch.tensor([[0.5]])])
    assert torch.allclose(p, torch.tensor([[0.2, 0.0, 0.8]])) and torch.allclose(half, p / 2)
    stem = hs.excitation_stem_map(net, x, "fc_pf", 3, contrastive=False)
    assert stem.shape == (2, 5, 28, 56) and float(stem.min()) >= 0
    # Units lit only by a BatchNorm shift (no positive input) cannot pass probability on: a little is lost.
    total = stem.sum(dim=(1, 2, 3))
    assert bool((total <= 1 + 1e-4).all()) and bool((total > 0.97).all()), total
    con = hs.excitation_stem_map(net, x, "fc_pf", 3, contrastive=True)
    assert float(con.sum(dim=(1, 2, 3)).abs().max()) < 0.03
    assert float(con.max()) > 0 and float(con.min()) < 0
    up = hs.saliency_batch(net, x, "fc_pf", 3, "excitation")
    assert up.shape == (2, 5, 56, 112)
    assert torch.allclose(up[:, :, ::2, ::2], stem)          # stem pixel i sits on input pixel 2 i


def test_augmentations_undo_exactly():
    augs = hs.augmentations(16, seed=3)
    assert augs[0] == (0, 0, False) and len(set(augs)) > 10
    assert all(abs(dy) <= 8 and abs(dx) <= 16 for dy, dx, _ in augs)
    assert not any(rev for _, _, rev in hs.augmentations(16, seed=3, allow_reverse=False))
    vol = np.random.default_rng(0).random((9, 112, 224)).astype(np.float32)
    for a in augs:
        back, valid = hs.undo_augmentation(hs.apply_augmentation(vol, a), a)
        assert np.array_equal(back[valid], vol[valid])
        assert valid.sum() == 9 * (112 - abs(a[0])) * (224 - abs(a[1]))
    with pytest.raises(InputError):
        hs.augmentations(0)
    with pytest.raises(InputError, match="unknown grading head"):
        hs.parse_heads("fc_xyz")
    assert [h.name for h in hs.parse_heads("UpperEndplateDefect, fc_led,ued")] == ["fc_ued", "fc_led"]
    assert hs.parse_heads(HEADS[10]) == [HEADS[10]] and hs.parse_heads(["Pfirrmann", HEADS[1]]) == list(HEADS[:2])
    with pytest.raises(InputError, match="unknown hotspot method"):
        hs.hotspot_volume(_random_net(), vol, "fc_led", 1, method="lrp", n_augment=1)


def test_maps_land_where_the_volume_came_from(tmp_path):
    """A single hot voxel goes to sample_to_canonical(voxel) on the canonical grid and to its RAS in the file."""
    import SimpleITK as sitk

    ph = phantom.make_phantom(fov="lumbar", shape=(160, 160), pixel_spacing=(2.0, 2.0), n_slices=9,
                              orientation="ras", seed=4)
    vols = ivd.extract_ivd_volumes(ph.scan, phantom_vertebrae(ph))
    v = vols[2]
    m = np.zeros((9, 112, 224), np.float32)
    m[3, 56:68, 96:108] = 1.0           # a 12x12-pixel (about 4 mm) hot patch on volume slice 3
    canon = hs.canonical_hotspot_map(ph.scan, [v], [m])
    r, c, s, _ = v.sample_to_canonical @ np.array([3, 61.5, 101.5, 1.0])
    peak = np.array(np.unravel_index(int(np.argmax(canon)), canon.shape))
    assert np.abs(peak - np.array([r, c, s])).max() <= 1.0 and canon.max() > 0.5
    assert canon[..., [k for k in range(9) if k != int(round(s))]].max() == 0
    net = _random_net()
    maps = hs.hotspot_maps(ph.scan, vols[:2], net, "fc_led", method="gradient", n_augment=1)
    paths = write_hotspot_maps(tmp_path, maps)
    assert [p.name for p in paths] == ["hotspots_LowerEndplateDefect.nii.gz"]
    img = sitk.ReadImage(str(paths[0]))
    assert img.GetSize() == tuple(ph.scan.input_shape_ijk)
    arr = sitk.GetArrayFromImage(img)
    assert 0.5 < arr.max() <= 1.0 and arr.min() >= 0        # grid points need not hit the peak
    # the file's own geometry puts the input map where the canonical map is
    inp = hs.input_hotspot_map(ph.scan, [v], [m])
    k, j, i = np.unravel_index(int(np.argmax(inp)), inp.shape)
    ras_file = ph.scan.input_ijk_to_ras @ np.array([i, j, k, 1.0])
    ras_want = ph.scan.canonical_to_ras @ np.array([r, c, s, 1.0])
    assert np.linalg.norm(ras_file[:3] - ras_want[:3]) <= 2.0 * np.sqrt(3)


# --------------------------------------------------------------------------- the demonstration


#: Phantoms no training run saw (the trainer's phantoms draw other seeds): (seed, level whose upper
#: endplate has the notch, so the lower endplate of the disc above it is defective).
CASES = ((777, "L3"), (780, "L4"))


@pytest.mark.parametrize("method", ["contrastive_excitation", "guided"])
def test_several_heads_at_once_give_each_head_its_own_map(method):
    """`--hotspots Pfirrmann,Herniation,...`: the heads of a disc share its augmented volumes' forward
    passes (issue 16), and each map is exactly the one that head gets alone, a foraminal head (never
    augmented by reversing the slices) and a given class included; a class a head lacks is refused."""
    net = _random_net(seed=2)
    vol = np.random.default_rng(5).random((9, 112, 224)).astype(np.float32)
    heads, classes = ["fc_pf", "fc_fsl", "Herniation", "fc_led"], [None, None, 1, None]
    together = hs.hotspot_volumes(net, vol, heads, classes, method=method, n_augment=4, precision="fp32")
    for head, cls, m in zip(heads, classes, together):
        alone = hs.hotspot_volume(net, vol, head, cls, method=method, n_augment=4, precision="fp32")
        assert np.array_equal(m, alone), head
    with pytest.raises(InputError, match="class 7 does not exist"):
        hs.hotspot_volumes(net, vol, ["fc_pf", "Herniation"], [None, 7], method=method, n_augment=1)


@pytest.fixture(scope="module")
def grader():
    if not FIXTURE.is_file():
        pytest.skip(f"missing fixture {FIXTURE}")
    return checkpoints.load_model("grading", FIXTURE)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"seed{c[0]}-{c[1]}")
def notch_case(request):
    seed, level = request.param
    ph = phantom.make_phantom(fov="lumbar", contrast="T2", pixel_spacing=(0.9, 0.9), n_slices=11,
                              slice_thickness_mm=4.0, rotation_deg=6.0, noise=0.02, variability=1.0,
                              seed=seed, pathology={level: ["endplate_notch"]})
    vols = {v.level: v for v in ivd.extract_ivd_volumes(ph.scan, phantom_vertebrae(ph))}
    disc = next(name for name in vols if name.endswith("-" + level))
    return ph, vols, disc


def _lesion_boxes_in_volume(vol, lesion):
    """The lesion's GT boxes (canonical pixels, per slice) mapped into the volume: volume slice ->
    the axis-aligned (x0, y0, x1, y1) box of the mapped corners."""
    inv = np.linalg.inv(vol.sample_to_canonical)
    out = {}
    for s, (x0, y0, x1, y1) in lesion["boxes"].items():
        pts = np.array([[y, x, s, 1.0] for x in (x0, x1) for y in (y0, y1)]) @ inv.T
        out[int(round(pts[0, 0]))] = (pts[:, 2].min(), pts[:, 1].min(), pts[:, 2].max(), pts[:, 1].max())
    return out


def test_grader_fixture_sees_the_notch(grader, notch_case):
    ph, vols, disc = notch_case
    led = [h.name for h in HEADS].index("fc_led")
    names = list(vols)
    x = torch.from_numpy(np.stack([vols[k].volume for k in names]))[:, None]
    with torch.no_grad():
        p = torch.softmax(grader(x)[led], dim=1)[:, 1].numpy()
    assert [n for n, pi in zip(names, p) if pi > 0.5] == [disc], dict(zip(names, p.round(2)))


@pytest.mark.parametrize("method", ["contrastive_excitation", "guided", "gradient"])
def test_hotspot_overlaps_the_lesion(grader, notch_case, method):
    """Threshold at half the maximum (after SMOOTH_PX smoothing) on the lesion's slices; IoU with the
    GT box >= 0.3 (the 2017 paper's Table 3: 0.15-0.41) and the peak on the lesion.  Plain
    back-propagation is the noisy baseline (IoU 0.13-0.19 here): its box need only overlap."""
    ph, vols, disc = notch_case
    vol = vols[disc]
    boxes = _lesion_boxes_in_volume(vol, ph.lesions[0])
    m = hs.hotspot_volume(grader, vol, "fc_led", 1, method=method, n_augment=8, seed=0)
    assert m.shape == (9, 112, 224) and m.dtype == np.float32 and m.max() == pytest.approx(1.0)
    sl = sorted(boxes)
    gt = (min(b[0] for b in boxes.values()), min(b[1] for b in boxes.values()),
          max(b[2] for b in boxes.values()), max(b[3] for b in boxes.values()))
    on_lesion = m[sl].mean(axis=0)
    box = hs.hotspot_box(on_lesion, THRESHOLD)
    iou = hs.box_iou(box, gt)
    print(f"{disc} {method}: hotspot box {np.round(box, 1)} lesion {np.round(gt, 1)} IoU {iou:.2f}")
    if method != "gradient":       # the peak itself lies on the lesion
        smooth = hs.smooth_map(on_lesion)
        py, px = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
        assert gt[0] <= px <= gt[2] and gt[1] <= py <= gt[3]
    assert iou >= (MIN_IOU if method != "gradient" else 0.05)
    # the hotspot is on the lesion's slices, not elsewhere in the volume
    per_slice = m.reshape(9, -1).max(axis=1)
    assert int(np.argmax(per_slice)) in sl


def test_bf16_hotspot_maps_follow_the_fp32_ones(grader):
    """Hotspot maps in bfloat16 (``--hotspot-precision``; "auto" where the CPU computes bfloat16
    natively, and always for a grader loaded with ``--precision bf16``): about 1.9x faster with the
    official-size grader (benchmarks/RESULTS.md), and the maps stay the fp32 ones up to rounding.
    A grader that reads one slice (the bundled one) keeps float32 (models/precision.py)."""
    from SpineNetLib.models.precision import with_precision
    from SpineNetLib.weights.resolve import resolve_weights

    assert grader.config.input_slices == 9
    ph = phantom.make_phantom(seed=1, shape=(256, 256), pixel_spacing=(1.2, 1.2), n_slices=9)
    disc = ivd.extract_ivd_volumes(ph.scan, phantom_vertebrae(ph))[-1]
    head = HEADS[[h.name for h in HEADS].index("fc_led")]
    fp32 = hs.hotspot_volume(grader, disc.volume, head, n_augment=2, precision="fp32")
    bf16 = hs.hotspot_volume(grader, disc.volume, head, n_augment=2, precision="bf16")
    assert not np.array_equal(fp32, bf16)          # really computed in bfloat16
    # as written (smoothed, SMOOTH_PX): the same map and hotspot box (measured r 0.9987-0.9998, IoU >= 0.93)
    smooth32, smooth16 = hs.smooth_map(fp32), hs.smooth_map(bf16)
    assert np.corrcoef(smooth32.ravel(), smooth16.ravel())[0, 1] > 0.995
    assert hs.box_iou(hs.hotspot_box(smooth32[4]), hs.hotspot_box(smooth16[4])) > 0.85
    auto = hs.hotspot_volume(grader, disc.volume, head, n_augment=2)
    assert np.array_equal(auto, bf16 if native_bfloat16(torch.device("cpu")) else fp32)
    wrapped = with_precision(grader, "bf16")
    assert np.array_equal(hs.hotspot_volume(wrapped, disc.volume, head, n_augment=2), bf16)
    assert np.array_equal(hs.hotspot_volume(wrapped, disc.volume, head, n_augment=2, precision="fp32"), fp32)
    with pytest.raises(InputError, match="hotspot precision"):
        hs.hotspot_volume(grader, disc.volume, head, n_augment=1, precision="fp16")
    single = checkpoints.load_model("grading", resolve_weights("bundled").path("grading"))
    assert np.array_equal(hs.hotspot_volume(single, disc.volume, HEADS[-1], n_augment=2, precision="bf16"),
                          hs.hotspot_volume(single, disc.volume, HEADS[-1], n_augment=2, precision="fp32"))
