"""The prefix cache (``melora_pyro.prefix_cache``) on left-padded letter prompts; the packed cloze
path is tested in ``test_cloze.py``."""
import pytest
import torch

from melora_pyro.config import MeLoRAConfig
from melora_pyro.errors import ConfigError
from melora_pyro.methods import build_method
from melora_pyro.models import tiny_llama
from melora_pyro.prefix_cache import PrefixCachedLM


def test_prefix_cache_reproduces_the_full_model_whatever_the_padding():
    full, cached = tiny_llama(num_layers=4), PrefixCachedLM(tiny_llama(num_layers=4), split=2)
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3], mask[1, :1] = 0, 0
    with torch.no_grad():
        expected = full(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        assert torch.allclose(cached(ids, mask, logits_to_keep=1).logits, expected, atol=1e-6)
        wider = torch.cat([torch.zeros(3, 2, dtype=torch.long), ids], 1)
        wider_mask = torch.cat([torch.zeros(3, 2, dtype=torch.long), mask], 1)
        assert torch.allclose(cached(wider, wider_mask, logits_to_keep=1).logits, expected, atol=1e-5)
    assert len(cached.cache) == 3


def test_prefix_cache_refuses_adapters_below_the_split():
    config = MeLoRAConfig(rank=2, target_modules=("q_proj",))
    method = build_method("mle", PrefixCachedLM(tiny_llama(num_layers=4), split=2), config, [1, 2])
    with pytest.raises(ConfigError, match="adapters below layer 2 cannot be cached"):
        method.predict({"input_ids": torch.ones(1, 3, dtype=torch.long)}, 0)
