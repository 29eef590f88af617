"""SPIDER-format loading and ``spinenet train grader`` (issue #4 part B).

The SPIDER fixture is built here from phantoms: images/NAME.mha and
masks/NAME.mha with SPIDER's label codes (vertebra L5 = 1 upward, S1
unlabelled, discs 201 = L5-S1 upward, canal 100, whole-vertebra masks with
posterior elements) and a radiological_gradings.csv with the real header.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from SpineNetLib.weights import checkpoints
from SpineNetLib.discs import extraction as ivd
from SpineNetLib.synthetic import phantom
from SpineNetLib.training import spider
from SpineNetLib.training import grader as tg
from SpineNetLib.apps.cli import build_parser, main
from SpineNetLib.core.errors import InputError
from SpineNetLib.models.grading import HEADS, GradingConfig, GradingNet

SHAPE = (224, 224)


def _phantom(seed, pathology=None, contrast="T2"):
    return phantom.make_phantom(fov="lumbar", shape=SHAPE, pixel_spacing=(1.3, 1.3), n_slices=11, seed=seed,
                                contrast=contrast, variability=1.0, pathology=pathology or {})


@pytest.fixture(scope="module")
def spider_root(tmp_path_factory):
    """Two patients (1: t1 + t2, 2: t2) and a gradings table with gaps."""
    root = tmp_path_factory.mktemp("spider")
    ph1 = _phantom(1, {"L4": ["endplate_notch"]})
    ph2 = _phantom(2)
    spider.phantom_case(ph1, root, "1_t2")
    spider.phantom_case(_phantom(1, contrast="T1"), root, "1_t1")
    spider.phantom_case(ph2, root, "2_t2")
    rows = []
    for patient, ph in (("1", ph1), ("2", ph2)):
        for d in ph.discs:
            n = spider.ivd_label_of(d.name)
            if patient == "2" and n == 3:
                continue                                 # no row at all: every task missing
            low = 1 if (patient == "1" and d.name == "L3-L4") else 0
            pf = "" if (patient == "2" and n == 2) else str(2 + n % 3)   # an empty cell: pfirrmann missing
            rows.append([patient, n, n % 2 * 2, 0, low, 0, int(n == 1), n % 2, 1, pf])
    rows.append(["1", 0, 0, 0, 0, 0, 0, 0, 0, 1])       # SPIDER has two "IVD label 0" rows
    with open(root / spider.GRADINGS_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(spider.GRADING_COLUMNS)
        w.writerows(rows)
    return root, {"1": ph1, "2": ph2}


# --------------------------------------------------------------------------- SPIDER tables and names


def test_spider_names_and_grade_mapping():
    assert spider.disc_level(1) == "L5-S1" and spider.disc_level(2) == "L4-L5" and spider.disc_level(6) == "T12-L1"
    assert all(spider.ivd_label_of(spider.disc_level(n)) == n for n in range(1, 20))
    with pytest.raises(InputError):
        spider.disc_level(0)
    g = {"Modic": 2, "UP endplate": 1, "LOW endplate": 0, "Spondylolisthesis": 1, "Disc herniation": 0,
         "Disc narrowing": 1, "Disc bulging": 1, "Pfirrman grade": 5}
    assert spider.task_values(g) == {"pfirrmann": 4, "narrowing": 1, "spondylolisthesis": 1, "upper_endplate": 1,
                                     "lower_endplate": 0, "herniation": 0, "modic": 1}
    g.update({"Pfirrman grade": None, "Modic": 0, "Disc narrowing": 7})
    v = spider.task_values(g)
    assert "pfirrmann" not in v and "narrowing" not in v and v["modic"] == 0
    assert set(spider.TASK_COLUMNS) | set(tg.TIANCHI_DISC_TASKS) == set(tg.TASKS)


def test_real_gradings_header_is_read(tmp_path):
    real = spider.Path(__file__).resolve().parents[3] / "shared" / "data" / "spider" / spider.GRADINGS_FILE
    if real.is_file():
        table = spider.read_gradings(real)
        assert len(table) > 1000 and table[("1", 1)]["Pfirrman grade"] == 3
    bad = tmp_path / "g.csv"
    bad.write_text("Patient,IVD label,Modic\n1,1,0\n")
    with pytest.raises(InputError, match="UP endplate"):
        spider.read_gradings(bad)


def test_list_spider_cases_filters_sequences(spider_root):
    root, _ = spider_root
    assert [c.name for c in spider.list_spider_cases(root)] == ["1_t2", "2_t2"]
    assert [c.name for c in spider.list_spider_cases(root, None)] == ["1_t1", "1_t2", "2_t2"]
    (root / "overview.csv").write_text("new_file_name,subset\n1_t2,training\n2_t2,validation\n")
    try:
        assert [c.subset for c in spider.list_spider_cases(root)] == ["training", "validation"]
    finally:
        (root / "overview.csv").unlink()
    with pytest.raises(InputError, match="not a SPIDER folder"):
        spider.list_spider_cases(root / "images")


def test_discs_from_masks_match_ground_truth(spider_root):
    """Quads from whole-vertebra masks (posterior elements cut at the canal) give the ground-truth crops."""
    root, phs = spider_root
    case = spider.list_spider_cases(root)[0]
    discs = spider.case_discs(case, spider.read_gradings(root / spider.GRADINGS_FILE))
    ph = phs["1"]
    gt = {v.level: v for v in ivd.extract_ivd_volumes(ph.scan, tg.phantom_vertebrae(ph))}
    assert sorted(d.ivd.level for d in discs) == sorted(d.name for d in ph.discs)
    for d in discs:
        g = gt[d.ivd.level]
        centre = lambda v: v.sample_to_canonical @ np.array([4, 55.5, 111.5, 1.0])  # noqa: E731
        assert np.abs(centre(d.ivd)[:2] - centre(g)[:2]).max() < 2.0, d.ivd.level
        scale = lambda v: np.linalg.norm(v.sample_to_canonical[:2, 2])  # noqa: E731
        assert abs(scale(d.ivd) / scale(g) - 1) < 0.1      # mask corners are pixel centres (1.3 mm)
        assert d.lower_stand_in == (d.ivd.level == "L5-S1")      # S1 has no label: stand-in body
    l34 = next(d for d in discs if d.ivd.level == "L3-L4")
    assert l34.grades["LOW endplate"] == 1 and l34.ivd_label == 3
    # vertebra quads stop at the posterior wall, not at the posterior-element block
    _, labels = spider.load_spider_case(case)
    verts = spider.vertebrae_from_labels(labels)
    l4 = ph.vertebra("L4")
    q = verts[2].polygon_on(l4.mid_slice)
    assert np.abs(q - l4.quads[l4.mid_slice]).max() < 2.0


# --------------------------------------------------------------------------- losses and metrics


def _outputs(n, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h.n_classes, generator=g, requires_grad=requires_grad) for h in HEADS)


def test_set_and_any_likelihoods():
    out = _outputs(4)
    nar = tg.TASKS["narrowing"]
    ll = tg.task_log_likelihood(nar, out, torch.tensor([0, 1, 1, 0]))
    p = torch.softmax(out[1], 1)
    assert torch.allclose(ll, torch.log(torch.stack([p[0, 0], p[1, 1:].sum(), p[2, 1:].sum(), p[3, 0]])), atol=1e-6)
    modic = tg.TASKS["modic"]
    ll = tg.task_log_likelihood(modic, out, torch.tensor([0, 1, 0, 1]))
    pu, pl = torch.softmax(out[6], 1)[:, 0], torch.softmax(out[7], 1)[:, 0]
    want = torch.where(torch.tensor([0, 1, 0, 1]) == 0, torch.log(pu * pl), torch.log(1 - pu * pl))
    assert torch.allclose(ll, want, atol=1e-5)
    pred = tg.predict_task(nar, out)
    assert torch.equal(pred, (out[1].argmax(1) > 0).long())


def test_missing_labels_are_ignored():
    tasks = [tg.TASKS["pfirrmann"], tg.TASKS["herniation"], tg.TASKS["modic"]]
    weights = {t.name: torch.ones(t.n_values) for t in tasks}
    out = _outputs(3, requires_grad=True)
    y = torch.tensor([[2, -1, -1], [-1, -1, 1], [4, -1, -1]])
    loss, info = tg.grading_loss(out, y, tasks, weights)
    loss.backward()
    grad = lambda i: out[i].grad if out[i].grad is not None else torch.zeros_like(out[i])  # noqa: E731
    assert float(grad([h.name for h in HEADS].index("fc_hrn")).abs().sum()) == 0   # no herniation label
    assert float(grad(0)[1].abs().sum()) == 0         # sample 1 has no Pfirrmann grade
    assert float(grad(0)[0].abs().sum()) > 0 and float(grad(6)[1].abs().sum()) > 0
    assert float(grad(6)[0].abs().sum()) == 0         # sample 0 has no Modic grade
    assert "loss_herniation" not in info
    # all missing -> zero loss, still differentiable
    out2 = _outputs(2, requires_grad=True)
    loss2, _ = tg.grading_loss(out2, torch.full((2, 3), -1), tasks, weights)
    assert float(loss2.detach()) == 0.0


def test_class_weights_and_balanced_accuracy():
    s = [tg.GradingSample(np.zeros((9, 112, 224), np.float16), {"herniation": v}, "p") for v in (0, 0, 0, 1)]
    w = tg.class_weights(s, [tg.TASKS["herniation"], tg.TASKS["pfirrmann"]])
    assert torch.allclose(w["herniation"], torch.tensor([4 / 6, 2.0]))
    assert float(w["pfirrmann"].sum()) == 0
    # balanced sampling: the rare grade is drawn as often as the common one, so no re-weighting is left
    p = tg.sampling_probabilities(s, [tg.TASKS["herniation"]])
    assert np.allclose(p, [1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert torch.allclose(tg.class_weights(s, [tg.TASKS["herniation"]], p)["herniation"], torch.ones(2))
    s.append(tg.GradingSample(s[0].volume, {"pfirrmann": 2}, "q"))
    assert tg.sampling_probabilities(s, [tg.TASKS["herniation"]], "uniform")[-1] == 0   # no herniation grade
    r = tg.balanced_accuracy(np.array([0, 0, 0, 0, 1]), np.array([0, 0, 0, 1, 1]), 2)
    assert r["balanced_accuracy"] == pytest.approx(0.75) and r["accuracy"] == pytest.approx(0.8)
    assert r["recall"] == {"0": 1.0, "1": 0.5} and r["counts"] == {"0": 3, "1": 2}


def test_training_lowers_the_loss():
    """A few AdamW steps on a fixed batch of phantom discs (one with a notch) lower the class-balanced loss."""
    samples = tg.phantom_samples(1, seed=5, pathologies=("endplate_notch",), p=0.5, log=None)
    tasks = [tg.TASKS["upper_endplate"], tg.TASKS["lower_endplate"]]
    batch = [next(s for s in samples if s.targets["upper_endplate"] == 1),
             next(s for s in samples if not any(s.targets.values()))]
    weights = tg.class_weights(samples, tasks, tg.sampling_probabilities(samples, tasks))
    torch.manual_seed(0)
    net = GradingNet(GradingConfig((1, 1, 1, 1), 2))
    x = torch.from_numpy(np.stack([s.volume.astype(np.float32) for s in batch]))[:, None]
    y = torch.tensor([[s.targets[t.name] for t in tasks] for s in batch])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss, _ = tg.grading_loss(net(x), y, tasks, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


# --------------------------------------------------------------------------- command line


def _args(root, out, *extra):
    return ["train", "grader", "--data", str(root), "--out", str(out), "--steps", "3", "--head-steps", "2",
            "--batch-size", "2", "--base-width", "2", "--config-blocks", "1", "1", "1", "1",
            "--val-fraction", "0.5", "--threads", "2", "--save-every", "1", *extra]


def test_train_grader_end_to_end_and_resume(spider_root, tmp_path, capsys):
    root, _ = spider_root
    assert main(_args(root, tmp_path / "a")) == 0
    metrics = json.loads((tmp_path / "a" / "val_metrics.json").read_text())
    assert metrics["n_train"] > 0 and metrics["n_val"] > 0
    final = metrics["final"]
    assert set(final) <= set(tg.TASKS) and "lower_endplate" in metrics["tasks"]
    assert metrics["task_heads"]["lower_endplate"] == ["fc_led"] and metrics["task_heads"]["modic"] == ["fc_umc", "fc_lmc"]
    for name, r in final.items():
        assert 0.0 <= r["balanced_accuracy"] <= 1.0 and r["n"] == sum(r["counts"].values())
    assert metrics["after_joint_training"] is not None
    # the head stage ran with a frozen backbone: stage column in the log
    log = list(csv.DictReader(open(tmp_path / "a" / "log.csv")))
    assert [r["stage"] for r in log] == ["1", "1", "1", "2", "2"]
    net = checkpoints.load_model("grading", tmp_path / "a" / "grading.pt")
    assert net.config == GradingConfig((1, 1, 1, 1), 2)
    out = capsys.readouterr().out
    assert "balanced accuracy" in out

    # interrupted after 2 steps, then resumed: same weights as the uninterrupted run
    args = build_parser().parse_args(_args(root, tmp_path / "b"))
    args.stop_after = 2
    args.func(args)
    assert not (tmp_path / "b" / "grading.pt").exists()
    assert main(_args(root, tmp_path / "b", "--resume")) == 0
    a = checkpoints.load_model("grading", tmp_path / "a" / "grading.pt").state_dict()
    b = checkpoints.load_model("grading", tmp_path / "b" / "grading.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a different setting on --resume is refused
    assert main(_args(root, tmp_path / "b", "--resume", "--lr", "0.5")) == 2


def test_train_grader_bad_input(tmp_path, capsys):
    assert main(["train", "grader", "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert "no training data" in capsys.readouterr().err
    assert main(["train", "grader", "--data", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "not a SPIDER folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tianchi/ disc tags


def test_tianchi_tags_map_onto_herniation_and_endplate_defects():
    from SpineNetLib.training import grader as tg

    assert tg.tianchi_disc_targets("v1") == {"herniation": 0, "endplate_defect": 0}
    assert tg.tianchi_disc_targets("v2") == {"herniation": 0, "endplate_defect": 0}   # a bulge is no herniation
    assert tg.tianchi_disc_targets("v3") == {"herniation": 1, "endplate_defect": 0}   # protrusion
    assert tg.tianchi_disc_targets("v4") == {"herniation": 1, "endplate_defect": 0}   # extrusion
    assert tg.tianchi_disc_targets("v5") == {"herniation": 0, "endplate_defect": 1}   # Schmorl node
    assert tg.tianchi_disc_targets("v3,v5") == {"herniation": 1, "endplate_defect": 1}
    assert tg.tianchi_disc_targets("") == {}
    assert tg.tianchi_disc_targets("v9") == {}                                         # unknown: nothing taught


def test_a_single_slice_grader_reads_only_the_central_slice_and_names_its_trained_heads(tmp_path):
    from SpineNetLib.discs.grading import GRADE_COLUMNS, grade_volumes, trained_columns
    from SpineNetLib.models.grading import GradingConfig, GradingNet

    torch.manual_seed(0)
    net = GradingNet(GradingConfig((1, 1, 1, 1), 4, input_slices=1)).eval()
    rng = np.random.default_rng(0)
    volume = rng.random((9, 112, 224)).astype(np.float32)
    other = volume.copy()
    other[:4] = rng.random((4, 112, 224))
    other[5:] = 0.0
    with torch.no_grad():
        a, b = net(torch.from_numpy(volume)[None, None]), net(torch.from_numpy(other)[None, None])
    assert all(torch.allclose(x, y) for x, y in zip(a, b))              # slices other than 4 are not read
    path = checkpoints.save_checkpoint(tmp_path / "grading.pt", "grading", net,
                                       extra={"trained_heads": "fc_hrn,fc_led,fc_ued"})
    loaded = checkpoints.load_model("grading", path)
    assert loaded.config.input_slices == 1
    assert trained_columns(loaded) == ("UpperEndplateDefect", "LowerEndplateDefect", "Herniation")
    graded = grade_volumes([volume], loaded)[0]
    assert set(graded) == {"UpperEndplateDefect", "LowerEndplateDefect", "Herniation"}
    assert trained_columns(net) == tuple(GRADE_COLUMNS)                  # no record: every head (official)


def test_the_weight_average_is_what_is_saved(spider_root, tmp_path):
    """--ema saves the running average of the weights (recorded in the run's config), not the last weights."""
    root, _ = spider_root
    assert main(_args(root, tmp_path / "raw")) == 0
    assert main(_args(root, tmp_path / "avg", "--ema", "0.9")) == 0
    raw = checkpoints.load_model("grading", tmp_path / "raw" / "grading.pt").state_dict()
    avg = checkpoints.load_model("grading", tmp_path / "avg" / "grading.pt").state_dict()
    assert any(not torch.equal(raw[k], avg[k]) for k in raw if raw[k].is_floating_point())
    config = json.loads((tmp_path / "avg" / "config.json").read_text())
    assert config["ema"] == 0.9


def test_an_interrupted_run_with_a_weight_average_resumes_to_the_same_weights(spider_root, tmp_path):
    """checkpoint-latest.pt keeps the --ema average, so a resumed run saves what an uninterrupted one saves
    (it used to restart the average from the freshly built network, mixing its random weights in)."""
    root, _ = spider_root
    assert main(_args(root, tmp_path / "full", "--ema", "0.9")) == 0
    args = build_parser().parse_args(_args(root, tmp_path / "split", "--ema", "0.9"))
    args.stop_after = 2
    args.func(args)
    state = torch.load(tmp_path / "split" / "checkpoint-latest.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 2 and "ema" in state["extra"]
    assert main(_args(root, tmp_path / "split", "--ema", "0.9", "--resume")) == 0
    full = torch.load(tmp_path / "full" / "grading.pt", weights_only=True)["model_weights"]
    split = torch.load(tmp_path / "split" / "grading.pt", weights_only=True)["model_weights"]
    assert full.keys() == split.keys()
    assert all(torch.equal(full[k], split[k]) for k in full)


def test_the_threshold_shift_maximises_balanced_accuracy_on_the_calibration_discs():
    from SpineNetLib.training.grader_threshold import best_shift

    # present discs score around +1, absent ones around -1, but the present ones sit lower: a shift of
    # about +1.5 separates them best
    difference = np.array([-3.0, -2.5, -2.0, -1.8, -1.6, -1.2, -0.4, 0.3, 0.8])
    truth = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    shift, balanced = best_shift(difference, truth)
    assert balanced == 1.0 and 1.25 <= shift <= 1.5
    assert best_shift(np.array([-1.0, 1.0]), np.array([0, 1])) == (0.0, 1.0)   # ties: the smallest shift
    with pytest.raises(InputError, match="one class"):
        best_shift(np.array([0.0, 1.0]), np.array([1, 1]))


def test_cross_validation_tests_every_patient_once_on_a_grader_that_never_saw_it(tmp_path):
    """benchmarks/crossval_grader.py: folds split by patient, calibration studies taken from the other
    folds only, and ``train_grader(samples=...)`` trains on exactly the samples it is given."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "crossval_grader", Path(__file__).resolve().parents[2] / "benchmarks" / "crossval_grader.py")
    cv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cv)
    samples = tg.phantom_samples(4, seed=3, pathologies=("endplate_notch",), p=0.5, log=None)
    fold_of = cv.fold_assignment([s.group for s in samples], 2)
    assert sorted(set(fold_of.values())) == [0, 1]
    seen_in_test = []
    for fold in (0, 1):
        trainable, test = cv.fold_subsets(samples, fold_of, fold, n_calibration=1)
        test_groups = {s.group for s in test}
        seen_in_test += sorted(test_groups)
        assert test_groups.isdisjoint(s.group for s in trainable)
        assert len({s.group for s in trainable if s.subset == "validation"}) == 1
        assert {s.subset for s in trainable} == {"training", "validation"}
    assert sorted(seen_in_test) == sorted(set(fold_of))

    trainable, _ = cv.fold_subsets(samples, fold_of, 0, n_calibration=1)
    args = build_parser().parse_args(["train", "grader", "--phantoms", "1", "--out", str(tmp_path / "f"),
                                      "--steps", "2", "--head-steps", "0", "--batch-size", "2", "--base-width", "2",
                                      "--config-blocks", "1", "1", "1", "1", "--threads", "1"])
    tg.train_grader(args, samples=trainable)
    metrics = json.loads((tmp_path / "f" / "val_metrics.json").read_text())
    assert metrics["n_train"] == sum(s.subset == "training" for s in trainable)
    assert metrics["n_val"] == sum(s.subset == "validation" for s in trainable)
    # the fold's grader with its shift built in (checked on volumes by grader_on_volumes.py):
    # its herniation logit difference is the trained one's plus the shift, and it leaves the model alone
    model = checkpoints.load_model("grading", tmp_path / "f" / "grading.pt").eval()
    before = cv._logit_difference(model, samples[:4])
    from SpineNetLib.training.grader_threshold import save_with_shift

    save_with_shift(model, tmp_path / "f" / "grading.pt", "herniation", 1.5, tmp_path / "f" / "calibrated.pt")
    calibrated = checkpoints.load_model("grading", tmp_path / "f" / "calibrated.pt").eval()
    assert np.allclose(cv._logit_difference(calibrated, samples[:4]), before + 1.5, atol=0.02)   # fp16 file
    assert np.array_equal(cv._logit_difference(model, samples[:4]), before)


def test_degraded_training_discs_keep_the_bodies_level_and_change_sharpness_and_contrast():
    """--degrade: a volume-like disc (blurred, other contrast, noisy) keeps the normalised bodies' level."""
    volume = np.full(ivd.IVD_SHAPE, tg.BODY_LEVEL, np.float32)
    volume[:, 50:62, 60:160] = 0.6          # a bright disc between two bodies
    volume[:, :, 180:] = 0.9                # the canal
    seen_contrast, seen_blur = set(), set()
    for seed in range(40):
        out = tg.degrade_image(np.random.default_rng(seed), volume)
        assert out.shape == volume.shape and out.min() >= 0.0 and out.max() <= 1.0
        assert abs(float(np.median(out[:, 5:40, 60:160])) - tg.BODY_LEVEL) < 0.02
        disc = float(np.median(out[:, 54:58, 80:140]))
        seen_contrast.add("higher" if disc > 0.65 else "lower" if disc < 0.55 else "same")
        edge = abs(float(out[4, 49, 100]) - tg.BODY_LEVEL)      # the pixel just above the disc
        seen_blur.add(edge > 0.03)
    assert seen_contrast >= {"higher", "lower"} and seen_blur == {True, False}
    same = tg.degrade_image(np.random.default_rng(3), volume)
    assert np.array_equal(same, tg.degrade_image(np.random.default_rng(3), volume))
    # --degrade 0 leaves the recipe as before; out of range is refused
    rng = np.random.default_rng(0)
    plain = tg.augment_volume(np.random.default_rng(0), volume, 1.0, True, 0.0)
    assert np.array_equal(plain, tg.augment_volume(rng, volume, 1.0, True))


def test_train_grader_refuses_a_degrade_chance_outside_0_1(tmp_path, capsys):
    assert main(["train", "grader", "--phantoms", "2", "--degrade", "1.5", "--out", str(tmp_path / "g")]) == 2
    assert "--degrade" in capsys.readouterr().err
