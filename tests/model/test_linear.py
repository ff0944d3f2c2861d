"""The oneDNN Linear's packed (blocked) weight copy never goes stale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvcache.model.linear import ONEDNN_LINEAR, Linear

pytestmark = pytest.mark.skipif(not ONEDNN_LINEAR, reason="no oneDNN linear in this torch build")


@pytest.fixture
def linear():
    torch.manual_seed(0)
    layer = Linear(32, 48).requires_grad_(False)
    layer.pack()
    assert layer.packed is not None
    return layer


def check(layer: Linear, rows: int) -> None:
    x = torch.randn(1, rows, 32)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 16, 300])
def test_packed_and_plain_paths_equal_f_linear(linear, rows):
    check(linear, rows)


def test_in_place_weight_update_repacks(linear):
    with torch.no_grad():
        linear.weight.mul_(-3.0)
    check(linear, 16)


def test_load_state_dict_repacks(linear):
    other = Linear(32, 48)
    linear.load_state_dict(other.state_dict())
    check(linear, 16)


def test_replaced_weight_repacks(linear):
    linear.weight = torch.nn.Parameter(torch.randn(48, 32), requires_grad=False)
    check(linear, 16)


def test_load_model_packs_unless_asked_not_to(llama_dir):
    from kvcache.model.loader import load_model

    packed, plain = load_model(llama_dir), load_model(llama_dir, pack=False)
    layers = [m for m in packed.modules() if isinstance(m, Linear)]
    assert layers and all(m.packed is not None for m in layers)
    assert all(m.packed is None for m in plain.modules() if isinstance(m, Linear))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids), plain(ids), atol=1e-5, rtol=1e-5)


def _no_grad_mul(w):
    with torch.no_grad():
        w.mul_(3.0)


EDITS = {
    "data.mul_": lambda w: w.data.mul_(-2.0),
    "data.copy_": lambda w: w.data.copy_(torch.randn(w.shape)),
    "data[...] =": lambda w: w.data.__setitem__((slice(0, 3),), 0.25),
    "data = new": lambda w: setattr(w, "data", torch.randn(w.shape)),
    "numpy() in place": lambda w: w.numpy().__imul__(0.5),
    "detach().add_": lambda w: w.detach().add_(1.0),
    "no_grad mul_": _no_grad_mul,
    "untracked alias taken before": None,  # below: the alias is taken first, written after a forward
}


@pytest.mark.parametrize("idiom", EDITS)
def test_every_in_place_idiom_is_seen(linear, idiom):
    """The idioms of quantization and weight-surgery code: the next forward uses the edited weight."""
    if idiom == "untracked alias taken before":
        alias = linear.weight.data
        check(linear, 4)
        alias.mul_(7.0)
    else:
        EDITS[idiom](linear.weight)
    check(linear, 4)
    check(linear, 16)


def test_a_handed_out_weight_is_read_directly_and_a_fresh_model_packs_again(llama_dir):
    from kvcache.model.loader import load_model

    model = load_model(llama_dir)
    head = model.layers[0].attn.qkv
    assert head.packed is not None and not head.weight.aliased
    head.weight.data  # an alias handed out: this weight is never served from a copy again
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    assert head.packed is None and model.layers[1].attn.qkv.packed is not None
    model.pack_weights()
    assert head.packed is None


def test_a_no_op_to_keeps_the_packed_copy_but_a_real_conversion_reads_directly(llama_dir):
    from kvcache.model.loader import load_model

    model = load_model(llama_dir).to(torch.float32)  # same dtype: PyTorch sets .data to the weight itself
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    assert all(m.packed is not None for m in layers)
    alias = torch.randn(layers[0].weight.shape)
    layers[0].weight.data = alias  # a tensor the caller keeps: never served from a copy again
    alias.mul_(2.0)
    x = torch.randn(1, 4, layers[0].in_features)
    with torch.inference_mode():
        torch.testing.assert_close(layers[0](x), F.linear(x, alias, layers[0].bias), atol=1e-5, rtol=1e-5)
    assert layers[0].packed is None
