"""Temperature scaling: the fitted T minimises validation NLL; map-ts never fits on test data."""
import math
import os
from pathlib import Path

import pytest
import torch

from melora_pyro import MeLoRAConfig
from melora_pyro.calibration import apply_temperature, fit_temperature, temperature_nll
from melora_pyro.data import holdout_validation, load_examples, train_and_validation
from melora_pyro.methods import build_method
from melora_pyro.metrics import accuracy
from melora_pyro.models import tiny_llama
from melora_pyro.train import TrainConfig

DATA = Path(os.environ.get("MELORA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _overconfident(n=400, k=4, seed=0):
    """Logits of a 60%-accurate classifier that is sharper than it should be, and its labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    right = torch.rand(n, generator=g) < 0.6
    logits[right, labels[right]] += 2.0
    return 4.0 * logits, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_fitted_temperature_minimises_validation_nll_against_a_grid(seed):
    logits, labels = _overconfident(seed=seed)
    t = fit_temperature(logits, labels)
    grid = torch.logspace(-2, 2, 2001).tolist()  # steps of 0.46% in T
    nlls = [temperature_nll(logits, labels, g) for g in grid]
    best = min(range(len(grid)), key=nlls.__getitem__)
    assert temperature_nll(logits, labels, t) <= nlls[best] + 1e-9
    assert abs(math.log(t / grid[best])) < 0.005
    assert t > 1.5  # the sharpened classifier is softened


def test_probabilities_and_logits_give_the_same_temperature_and_masked_labels_stay_at_zero():
    logits, labels = _overconfident(seed=2)
    logits[:5, 3] = -math.inf  # questions that do not offer the fourth label
    labels[:5] = labels[:5].clamp(max=2)
    probs = logits.softmax(-1)
    t = fit_temperature(probs, labels)
    assert t == pytest.approx(fit_temperature(logits, labels), rel=1e-5)
    scaled = apply_temperature(probs, t)
    assert torch.all(scaled[:5, 3] == 0) and torch.allclose(scaled.sum(-1), torch.ones(len(labels)))
    assert accuracy(scaled, labels) == accuracy(probs, labels)


def test_bad_input_raises_one_precise_error():
    logits, labels = _overconfident(n=10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        fit_temperature(logits, labels + 4)
    with pytest.raises(ValueError, match="probability 0"):
        fit_temperature(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        apply_temperature(logits, 0.0)


SEQ, LABEL_IDS = 6, [10, 11, 12]


def _examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (SEQ,), generator=g), int(torch.randint(0, 3, (), generator=g)))
            for _ in range(n)]


def _collate(examples):
    return {"input_ids": torch.stack([x for x, _ in examples]), "labels": torch.tensor([y for _, y in examples])}


def test_map_ts_fits_its_temperature_on_the_validation_examples_only():
    config = MeLoRAConfig(rank=2, target_modules=("q_proj", "v_proj"))
    train, val, test = _examples(24, 0), _examples(16, 1), _examples(16, 2)
    method = build_method("map-ts", tiny_llama, config, LABEL_IDS, val_examples=val, validation="val split")
    method.fit(train, _collate, TrainConfig(steps=3, batch_size=4, lr=1e-2))
    val_probs = method.base.predict(_collate(val), 0)
    assert method.temperature == pytest.approx(fit_temperature(val_probs, _collate(val)["labels"]), rel=1e-6)
    assert method.validation_nll["after"] <= method.validation_nll["before"]
    test_batch = _collate(test)
    expected = apply_temperature(method.base.predict(test_batch, 0), method.temperature)
    assert torch.allclose(method.predict(test_batch, 4), expected)
    assert method.adapter_state() == method.base.adapter_state()


def test_map_ts_without_validation_examples_holds_out_part_of_train():
    train = _examples(20, 0)
    kept, held, where = holdout_validation(train, seed=3)
    assert len(held) == 2 and len(kept) == 18 and "seed 3" in where
    assert {id(x) for x, _ in kept}.isdisjoint({id(x) for x, _ in held})
    config = MeLoRAConfig(rank=2, target_modules=("v_proj",))
    method = build_method("map-ts", tiny_llama, config, LABEL_IDS)
    seen = []
    method.fit(train, lambda ex: seen.append(ex) or _collate(ex), TrainConfig(steps=2, batch_size=4, seed=3))
    trained_on = {id(x) for batch in seen[:2] for x, _ in batch}
    assert trained_on.isdisjoint({id(x) for x, _ in held})   # the held-out examples are not trained on
    assert method.validation == where and method.temperature > 0


def test_validation_is_the_dev_split_where_there_is_one_never_test():
    if not DATA.is_dir():
        pytest.skip(f"benchmark data not found at {DATA} (set MELORA_DATA_DIR)")
    train = load_examples("arc-e", "train", DATA)
    same_train, val, where = train_and_validation("arc-e", train, DATA)
    test_ids = {ex.uid for ex in load_examples("arc-e", "test", DATA)}
    assert same_train is train and where == f"arc-e validation split ({len(val)})"
    assert {ex.uid for ex in val}.isdisjoint(test_ids) and len(val) == 570
    boolq_train = load_examples("boolq", "train", DATA, seed=0)
    kept, held, where = train_and_validation("boolq", boolq_train, DATA, seed=0)
    boolq_test = {ex.uid for ex in load_examples("boolq", "test", DATA, seed=0)}
    assert "hold-out of train" in where and len(kept) + len(held) == len(boolq_train)
    assert {ex.uid for ex in held}.isdisjoint(boolq_test)
