import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from torchglow.cli.errors import in_flags
from torchglow.tools import ood

from tool_checks import digits_like, make_model, open_png


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_model(seed=2)


# ------------------------------------------------------------------ metrics
def test_metrics_hand_checked_example():
    s_in, s_out = [1.0, 2.0, 3.0], [2.5, 4.0]
    # AUROC: of the 6 (out, in) pairs, 2.5 beats 1 and 2, 4 beats all three -> 5/6
    assert ood.auroc(s_in, s_out) == pytest.approx(5 / 6)
    # ranking 4(out) 3(in) 2.5(out) 2(in) 1(in): precision 1 at recall 1/2, 2/3 at recall 1
    # average precision = 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert ood.aupr(s_in, s_out) == pytest.approx(5 / 6)
    # flagging 95% of the OOD inputs needs threshold 2.5, which also flags the in-score 3: 1/3
    assert ood.fpr_at_95_tpr(s_in, s_out) == pytest.approx(1 / 3)
    m = ood.metrics(torch.tensor(s_in), torch.tensor(s_out))
    assert m == pytest.approx({"auroc": 5 / 6, "aupr": 5 / 6, "fpr_at_95_tpr": 1 / 3})


def test_metrics_extremes_and_ties():
    assert ood.auroc([0, 1], [2, 3]) == 1.0 and ood.fpr_at_95_tpr([0, 1], [2, 3]) == 0.0
    assert ood.auroc([2, 3], [0, 1]) == 0.0 and ood.fpr_at_95_tpr([2, 3], [0, 1]) == 1.0
    assert ood.auroc([1, 1], [1, 1]) == 0.5  # ties count half
    assert ood.aupr([0, 1], [2, 3]) == 1.0


def test_auroc_against_mann_whitney():
    g = np.random.default_rng(0)
    s_in = g.integers(0, 20, 200).astype(float)  # many ties
    s_out = g.integers(5, 25, 150).astype(float)
    greater = (s_out[:, None] > s_in[None, :]).sum()
    ties = (s_out[:, None] == s_in[None, :]).sum()
    expected = (greater + 0.5 * ties) / (s_in.size * s_out.size)
    assert ood.auroc(s_in, s_out) == pytest.approx(expected)


def test_fpr_at_95_tpr_by_counting():
    g = np.random.default_rng(1)
    s_in, s_out = g.normal(0, 1, 300), g.normal(1.5, 1, 40)
    # the threshold that flags at least 95% (38 of 40) of the OOD inputs: the 38th largest score
    thr = np.sort(s_out)[::-1][37]
    assert ood.fpr_at_95_tpr(s_in, s_out) == pytest.approx((s_in >= thr).mean())


def test_non_finite_scores_count_as_most_ood():
    assert ood.auroc([0.0, 1.0], [float("nan"), float("inf")]) == 1.0


# ------------------------------------------------------------------ scores
def test_scores_bpd_matches_the_model_and_is_seeded(model):
    x = digits_like(20, seed=3)
    s = ood.scores_bpd(model, x, batch_size=7, seed=5)
    assert s.shape == (20,) and s.dtype == torch.float64 and torch.isfinite(s).all()
    assert torch.equal(s, ood.scores_bpd(model, x, batch_size=7, seed=5))
    # the noise does not depend on the batch size (the float32 sums may differ in the last bits)
    torch.testing.assert_close(s, ood.scores_bpd(model, x, batch_size=20, seed=5), rtol=1e-6, atol=1e-6)
    assert (s - ood.scores_bpd(model, x, batch_size=7, seed=6)).abs().max() > 1e-3
    with torch.no_grad():
        expected = model.bits_per_dim(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(s.float(), expected, rtol=1e-6, atol=1e-6)


def test_scores_bpd_marginal_of_a_conditional_model():
    model = make_model(seed=2, num_classes=3)
    x = digits_like(6, seed=4)
    marginal = ood.scores_bpd(model, x, seed=0)
    per_class = torch.stack([ood.scores_bpd(model, x, seed=0, labels=torch.full((6,), c)) for c in range(3)])
    # bits/dim b = -(log p - D log 32) / (D ln 2), so log p(x|c) = D log 32 - D ln2 b_c, and
    # log p(x) = log(mean_c p(x|c)) with a uniform class prior
    d = 64
    log_p_c = d * math.log(32) - d * math.log(2) * per_class
    log_p = torch.logsumexp(log_p_c, 0) - math.log(3)
    torch.testing.assert_close(marginal, -(log_p - d * math.log(32)) / (d * math.log(2)), rtol=0, atol=1e-9)
    assert (marginal < per_class.mean(0)).all()  # Jensen: the mixture is likelier than the mean of its parts


def test_png_complexity_and_score(model):
    x = digits_like(8, seed=5)
    flat = torch.zeros(8, 1, 8, 8, dtype=torch.uint8)
    L_x, L_flat = ood.png_bits_per_dim(x, 5), ood.png_bits_per_dim(flat, 5)
    assert torch.isfinite(L_x).all() and (L_x > L_flat).all()  # noise compresses worse than a flat image
    # L is the PNG file length: check one by hand
    import io

    buf = io.BytesIO()
    Image.fromarray(x[0, 0].numpy()).save(buf, format="PNG", compress_level=9)
    assert L_x[0].item() == 8 * len(buf.getvalue()) / 64
    bpd = ood.scores_bpd(model, x)
    s = ood.complexity_scores(bpd, x, 5)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, bpd - L_x)


def test_typicality_scores_by_hand():
    bpd = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    t1 = ood.typicality_scores(bpd, 2.5, 1, seed=0)
    assert sorted(t1.tolist()) == [0.5, 0.5, 1.5, 1.5, 2.5]
    t2 = ood.typicality_scores(bpd, 3.0, 2, seed=0)
    assert t2.numel() == 2  # the fifth image is left over
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    expected = (bpd[perm[:4]].reshape(2, 2).mean(1) - 3.0).abs()
    torch.testing.assert_close(t2, expected.double())
    assert ood.typicality_scores(bpd, 3.0, 6).numel() == 0


# ------------------------------------------------------------------ OOD sets
def test_flipped_and_inverted():
    x = digits_like(4, seed=6)
    assert torch.equal(ood.flipped(x)[:, :, 0], x[:, :, -1])
    assert torch.equal(ood.flipped(ood.flipped(x)), x)
    inv = ood.inverted(x, 5)
    assert x.max() == 128
    assert torch.equal(inv, (128 - x.int()).to(torch.uint8))  # within the digits' own range
    assert torch.equal(ood.inverted(inv, 5), x)
    full = torch.tensor([[[[0, 255, 8]]]], dtype=torch.uint8)
    assert ood.inverted(full, 5).flatten().tolist() == [248, 0, 240]  # bins 31 - b
    assert ood.inverted(full, 8).flatten().tolist() == [255, 0, 247]
    assert ood.inverted(full, 5, max_level=20).flatten().tolist() == [160, 0, 152]  # bins 20 - b, clamped at 0


def test_uniform_noise():
    a = ood.uniform_noise(50, (1, 8, 8), 5, seed=1, max_level=16)
    assert a.shape == (50, 1, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, ood.uniform_noise(50, (1, 8, 8), 5, seed=1, max_level=16))
    assert not torch.equal(a, ood.uniform_noise(50, (1, 8, 8), 5, seed=2, max_level=16))
    assert (a % 8 == 0).all() and a.max() == 128 and a.min() == 0
    assert ood.uniform_noise(50, (3, 4, 4), 5, seed=1).max() == 248


# ------------------------------------------------------------------ report
def test_ood_report(model, tmp_path, capsys):
    x = digits_like(40, seed=7)
    sets = {"flipped": ood.flipped(x), "inverted": ood.inverted(x, 5),
            "noise": ood.uniform_noise(30, (1, 8, 8), 5, seed=3, max_level=16), "same": x.clone()}
    summary = ood.ood_report(model, x, sets, tmp_path, batch_size=16, seed=0, typicality_m=(2, 5))
    printed = capsys.readouterr().out
    assert summary["table"] in printed
    assert json.loads((tmp_path / "ood.json").read_text()) == summary
    for f in ("bpd_hist.png", "complexity_hist.png"):
        assert open_png(tmp_path / f).size[0] > 100
    assert set(summary["metrics"]) == set(sets)
    bpd_in = ood.scores_bpd(model, x, 16, seed=0)
    for name, res in summary["metrics"].items():
        assert set(res) == {"bpd", "complexity", "typicality_m2", "typicality_m5"}
        assert name in summary["table"]
        # each entry is the metrics of that set's scores, computed here from the score functions
        bpd_out = ood.scores_bpd(model, sets[name], 16, seed=0)
        assert res["bpd"] == ood.metrics(bpd_in, bpd_out)
        assert res["complexity"] == ood.metrics(ood.complexity_scores(bpd_in, x, 5),
                                                ood.complexity_scores(bpd_out, sets[name], 5))
    # an exact copy of the in-distribution set with the same seed has identical scores
    assert summary["metrics"]["same"]["bpd"]["auroc"] == pytest.approx(0.5)
    assert summary["metrics"]["same"]["complexity"]["auroc"] == pytest.approx(0.5)
    # typicality batches: in-distribution is the held-out half (20 images), OOD all 40 / 30
    assert summary["metrics"]["flipped"]["typicality_m5"]["batches_in"] == 4
    assert summary["metrics"]["noise"]["typicality_m5"]["batches_out"] == 6
    assert summary["typicality_reference"] == "half of in_images"
    assert all(math.isfinite(v["mean"]) for v in summary["complexity"].values())
    # 40 images: bpd and complexity have enough scores; typicality, 10 and 4 batches of the 20
    # held-out images, does not
    assert sorted(summary["caveats"]) == sorted(f"typicality_m{m} of {name}: fewer than 20 scores on one side"
                                        for name in sets for m in (2, 5))
    marked = [line for line in summary["table"].splitlines() if line.endswith("  *")]
    assert len(marked) == len(summary["caveats"]) and all("typicality" in line for line in marked)
    assert "* from fewer than 20 scores" in summary["table"] and "--" not in summary["table"]
    assert in_flags(summary["table"]).endswith("score more images (--in-split all, --max-images 0)")  # as the CLI shows it


def test_ood_report_warns_when_metrics_rest_on_few_images(model, tmp_path):
    """A test split of 12 images: every metric from fewer than 20 scores is marked and warned about."""
    x = digits_like(12, seed=2)
    with pytest.warns(UserWarning, match="3 of the 3 OOD metrics rest on fewer than 20 scores"):
        summary = ood.ood_report(model, x, {"flipped": ood.flipped(x)}, tmp_path, typicality_m=(2, 10),
                                 verbose=False)
    assert summary["min_scores"] == 20 and len(summary["caveats"]) == 3
    assert summary["skipped"] == ["typicality_m10 for flipped: fewer than 10 images"]  # 6 held out: no batch


def test_ood_report_with_reference_set(model, tmp_path):
    x, ref = digits_like(20, seed=8), digits_like(30, seed=9)
    summary = ood.ood_report(model, x, {"flipped": ood.flipped(x)}, tmp_path, typicality_m=4,
                             in_reference=ref, verbose=False)
    assert summary["typicality_reference"] == "in_reference"
    assert summary["typicality_reference_bpd"] == pytest.approx(float(ood.scores_bpd(model, ref).mean()))
    assert summary["metrics"]["flipped"]["typicality_m4"]["batches_in"] == 5


def test_ood_sets(tmp_path):
    from torchglow.data import load_dataset, pick_indices

    x = digits_like(10, seed=20)
    for i in range(3):
        Image.new("RGB", (16, 12), color=(80 * i, 0, 0)).save(tmp_path / f"{i}.png")
    sets = ood.ood_sets(x, 5, ("noise", "flipped"), datasets=("digits",), folders=(str(tmp_path),), max_images=4,
                        seed=1)
    assert list(sets) == ["noise", "flipped", "digits/test", f"folder:{tmp_path}"]
    assert torch.equal(sets["flipped"], ood.flipped(x))
    assert sets["noise"].shape == x.shape and sets["noise"].max() <= x.max()  # the bins the data use
    digits = load_dataset("digits", "test")
    assert torch.equal(sets["digits/test"], digits.images[pick_indices(300, 4, seed=1)])
    folder = sets[f"folder:{tmp_path}"]
    assert folder.shape == (3, 1, 8, 8)  # all 3 images (< max_images), grey, resized to the model's size
    with pytest.raises(ValueError, match="unknown OOD transform"):
        ood.ood_sets(x, 5, ("rotated",))
