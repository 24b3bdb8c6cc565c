import math

import pytest
import torch

from melora_pyro.metrics import accuracy, brier, ece, nll, reliability_bins, summarize


def test_perfect_confident_predictions():
    probs = torch.eye(3)[[0, 2, 1, 0]]
    labels = torch.tensor([0, 2, 1, 0])
    assert summarize(probs, labels) == pytest.approx({"acc": 1.0, "ece": 0.0, "nll": 0.0, "brier": 0.0})


def test_uniform_predictions():
    probs = torch.full((4, 4), 0.25)
    labels = torch.tensor([0, 1, 2, 3])
    acc = accuracy(probs, labels)
    assert acc == 0.25  # ties go to class 0: only the first row is right
    assert nll(probs, labels) == pytest.approx(math.log(4))
    assert brier(probs, labels) == pytest.approx(0.75)  # (0.75)^2 + 3 * (0.25)^2
    assert ece(probs, labels) == pytest.approx(abs(acc - 0.25))


def test_uniform_ece_with_accuracy_above_confidence():
    probs = torch.full((2, 4), 0.25)
    assert ece(probs, torch.tensor([0, 0])) == pytest.approx(0.75)


def test_ece_two_bins_by_hand():
    # n_bins=4 (edges exact in binary): confidences 0.875 x2 fall in (0.75, 1], 0.75 x2 in (0.5, 0.75].
    probs = torch.tensor([[0.875, 0.125], [0.875, 0.125], [0.75, 0.25], [0.25, 0.75]])
    labels = torch.tensor([0, 1, 0, 1])
    # Top bin: accuracy 1/2, confidence 0.875 -> gap 0.375. Other: accuracy 1, confidence 0.75 -> gap 0.25.
    assert ece(probs, labels, n_bins=4) == pytest.approx(0.5 * 0.375 + 0.5 * 0.25)
    bins = reliability_bins(probs, labels, n_bins=4)
    assert bins.count.tolist() == [0, 0, 2, 2]  # 0.75 is a right edge: it belongs to (0.5, 0.75]
    assert bins.confidence.tolist() == pytest.approx([0, 0, 0.75, 0.875])
    assert bins.accuracy.tolist() == pytest.approx([0, 0, 1.0, 0.5])


def test_ece_unequal_bins_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.7, 0.3], [0.95, 0.05]])
    labels = torch.tensor([0, 1, 1, 0])
    # 3 rows at 0.7 with accuracy 1/3 (gap 0.7 - 1/3), 1 row at 0.95 correct (gap 0.05).
    assert ece(probs, labels, n_bins=10) == pytest.approx(0.75 * (0.7 - 1 / 3) + 0.25 * 0.05)


def test_confidence_one_falls_in_last_bin():
    bins = reliability_bins(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), n_bins=15)
    assert bins.count[-1] == 1 and bins.count.sum() == 1


def test_nll_clamps_zero_probability():
    value = nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert value == pytest.approx(-math.log(1e-12))


def test_brier_worst_case_and_partial():
    assert brier(torch.tensor([[0.0, 1.0]]), torch.tensor([0])) == pytest.approx(2.0)
    assert brier(torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([0])) == pytest.approx(0.25 + 0.09 + 0.04)


def test_returns_python_floats_and_accepts_other_dtypes():
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.bfloat16)
    labels = torch.tensor([0, 0], dtype=torch.int32)
    out = summarize(probs, labels)
    assert set(out) == {"acc", "ece", "nll", "brier"}
    assert all(type(v) is float for v in out.values())
    assert out["acc"] == 0.5


@pytest.mark.parametrize(
    "probs, labels",
    [
        (torch.full((3, 2), 0.5), torch.tensor([0, 1])),  # N mismatch
        (torch.full((3,), 0.5), torch.tensor([0, 1, 0])),  # probs not 2-D
        (torch.full((2, 2), 0.5), torch.tensor([[0], [1]])),  # labels not 1-D
    ],
)
def test_shape_errors_name_the_shapes(probs, labels):
    for fn in (accuracy, ece, nll, brier, summarize, reliability_bins):
        with pytest.raises(ValueError, match=str(tuple(probs.shape)).replace("(", r"\(").replace(")", r"\)")):
            fn(probs, labels)


def test_empty_input():
    for fn in (accuracy, ece, nll, brier, summarize, reliability_bins):
        with pytest.raises(ValueError, match="empty"):
            fn(torch.empty(0, 3), torch.empty(0, dtype=torch.long))


def test_label_out_of_range_and_bad_bins():
    with pytest.raises(ValueError, match="labels"):
        nll(torch.full((1, 2), 0.5), torch.tensor([2]))
    with pytest.raises(ValueError, match="n_bins"):
        ece(torch.full((1, 2), 0.5), torch.tensor([0]), n_bins=0)
