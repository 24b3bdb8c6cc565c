"""Integration on the real SmolLM2-135M-Instruct (slow: about a minute on 2 cores)."""
import copy

import pyro
import pytest
import torch
from pyro.infer import SVI, Predictive

from guides import MeanFieldGuide
from melora_pyro import FullWeightELBO, MeLoRAConfig, MeLoRAModel

pytestmark = pytest.mark.slow

PROMPTS = ["Question: What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:",
           "Question: Which is a colour?\nA. dog\nB. run\nC. red\nD. seven\nAnswer:"]


def test_inject_one_svi_step_and_predictive(smollm2):
    base, tokenizer = smollm2
    labels = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        base_probs = base(**enc).logits[:, -1, labels].softmax(-1)

    model = MeLoRAModel(copy.deepcopy(base), MeLoRAConfig(), labels)
    assert model.num_adapters == 60  # q_proj and v_proj of 30 layers
    guide = MeanFieldGuide(model)
    pyro.set_rng_seed(0)
    before = model.lora_B[0].detach().clone()
    loss = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), FullWeightELBO()).step(
        enc["input_ids"], enc["attention_mask"], torch.tensor([1, 2]), 100)
    assert torch.isfinite(torch.tensor(loss))
    assert not torch.equal(model.lora_B[0], before)

    probs = Predictive(model, guide=guide, num_samples=2, return_sites=["probs"])(
        enc["input_ids"], enc["attention_mask"])["probs"]
    assert probs.shape == (2, 2, 4)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2), atol=1e-5)
    # B starts small and one step moves it little: the adapted model still predicts like the base.
    assert torch.allclose(probs.mean(0), base_probs, atol=0.05)
