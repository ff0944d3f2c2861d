"""kvcache's quantized cache inside transformers' own generate: lossless configuration equal to DynamicCache,
lossy ones close, and transformers' cache operations (crop, beam reorder, batch ops)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvcache.hf import QuantizedCache


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


PROMPT = torch.tensor([[3, 17, 42, 8, 29, 11, 5, 60, 2, 33]])


def greedy(model, cache, n=30, prompt=PROMPT, **kwargs):
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=n, do_sample=False, cache=cache, pad_token_id=0,
                             eos_token_id=None, **kwargs)
    return out[:, prompt.shape[1]:]


def test_a_residual_longer_than_the_run_equals_dynamic_cache(hf_model):
    exact = greedy(hf_model, DynamicCache(config=hf_model.config))
    assert torch.equal(greedy(hf_model, QuantizedCache(hf_model.config, bits=4, residual=1000)), exact)


@pytest.mark.parametrize("spec", ["int8:residual=0,group=16", "int4:residual=8,group=16",
                                  "int4:keys=channel,group=16,residual=0", "int4:rotate=1,residual=0,group=16"])
def test_lossy_configurations_stay_close(hf_model, spec):
    exact = greedy(hf_model, DynamicCache(config=hf_model.config))[0]
    cache = QuantizedCache(hf_model.config, spec=spec)
    got = greedy(hf_model, cache)[0]
    agree = (got == exact).float().mean().item()
    assert agree >= (0.9 if spec.startswith("int8") else 0.5), agree
    assert 0 < cache.nbytes


def test_the_stored_form_is_what_update_returns(hf_model):
    """The quantized layers return exactly their quantized view: K/V round-trip through the codes."""
    cache = QuantizedCache(hf_model.config, spec="int8:residual=0,group=16")
    greedy(hf_model, cache, n=20)
    layer = cache.layers[0]
    k, v = layer.store.materialize(0)
    assert k.shape[2] == cache.get_seq_length() == PROMPT.shape[1] + 19
    assert layer.store.qcounts[0] > 0


def test_crop_beam_and_batch_operations(hf_model):
    cache = QuantizedCache(hf_model.config, bits=8, residual=4, group=16)
    with torch.no_grad():
        hf_model(PROMPT.repeat(2, 1), cache=cache)
    n = cache.get_seq_length()
    cache.crop(-3)
    assert cache.get_seq_length() == n - 3
    with pytest.raises(ValueError, match="negative count"):
        cache.crop(2)
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].store.batch == 4
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert cache.layers[0].store.batch == 2


def test_beam_search_through_transformers(hf_model):
    exact = greedy(hf_model, DynamicCache(config=hf_model.config), n=12, num_beams=3)
    got = greedy(hf_model, QuantizedCache(hf_model.config, bits=8, residual=1000), n=12, num_beams=3)
    assert torch.equal(got, exact)


def test_bad_options_fail_at_construction(hf_model):
    with pytest.raises(ValueError, match="unknown option"):
        QuantizedCache(hf_model.config, spec="int4:foo=1")
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantizedCache(hf_model.config, bits=3)
    with pytest.raises(ValueError, match="int8/int4 spec"):
        QuantizedCache(hf_model.config, spec="fp32")


def test_smollm2_greedy_through_transformers(hf_real_model):
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1789, 28, 2986, 30]])
    exact = greedy(hf_real_model, DynamicCache(config=hf_real_model.config), n=24, prompt=prompt)
    same = greedy(hf_real_model, QuantizedCache(hf_real_model.config, bits=4, residual=1000), n=24, prompt=prompt)
    assert torch.equal(same, exact)
    int8 = greedy(hf_real_model, QuantizedCache(hf_real_model.config, spec="int8:residual=0"), n=24, prompt=prompt)
    assert (int8 == exact).float().mean() >= 0.9
