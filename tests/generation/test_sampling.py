"""sample() for every temperature validation accepts: finite probabilities, a valid token, argmax as it goes to 0."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from kvcache.generation.sampling import SamplingConfig, sample


@given(temperature=st.floats(min_value=5e-324, max_value=1e6, allow_nan=False, allow_infinity=False),
       top_k=st.none() | st.integers(1, 40), top_p=st.none() | st.floats(1e-6, 1.0),
       scale=st.sampled_from([1.0, 1e4, 1e30]), seed=st.integers(0, 2**32))
def test_any_accepted_temperature_samples_a_valid_token(temperature, top_k, top_p, scale, seed):
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(seed)) * scale
    token = sample(logits, SamplingConfig(temperature, top_k, top_p), torch.Generator().manual_seed(seed))
    assert token.shape == (2,) and ((0 <= token) & (token < 40)).all()
    if temperature <= 1e-6 and scale == 1.0 and top_k is None:
        assert torch.equal(token, logits.argmax(-1))


def test_sampling_is_unchanged_in_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    draws = torch.stack([sample(logits, SamplingConfig(1.0), torch.Generator().manual_seed(i)) for i in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=3).double() / 4000
    assert torch.allclose(freq, torch.softmax(logits.double(), -1)[0], atol=0.03)
