"""Named model shapes for demos and benchmarks, built with seeded random weights.

Random weights show the mechanics (and the speed, which does not depend on
the values) without a download; outputs are noise and are labelled as such.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig
from .tokenizer import Tokenizer
from .transformer import Transformer

SHAPES: dict[str, dict] = {
    "gpt2-small": dict(arch="gpt2", model_type="gpt2", vocab_size=50257, hidden_size=768, num_layers=12,
                       num_heads=12, num_kv_heads=12, head_dim=64, intermediate_size=3072, max_positions=1024,
                       attention_bias=True, tie_word_embeddings=True, eos_token_id=50256),
    "llama-135m": dict(arch="llama", model_type="llama", vocab_size=49152, hidden_size=576, num_layers=30,
                       num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536, max_positions=2048,
                       norm_eps=1e-5, tie_word_embeddings=True, eos_token_id=0),
    # the shipped model's shape with a longer context: cheap enough for quadratic baselines
    "tiny-llama": dict(arch="llama", model_type="llama", vocab_size=4096, hidden_size=256, num_layers=6,
                       num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=704, max_positions=2048,
                       norm_eps=1e-5, tie_word_embeddings=True, eos_token_id=0),
}


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return ModelConfig(**SHAPES[name])


def hf_config_dict(name: str) -> dict:
    """The transformers config of a shape (to build the same model in transformers)."""
    from .export import hf_config

    with torch.device("meta"):
        return hf_config(Transformer(shape_config(name)))


def random_model(name: str = "gpt2-small", seed: int = 0) -> Transformer:
    """A model of a named shape with N(0, 0.02) weights from ``seed``."""
    config = shape_config(name)
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.num_layers) if pname.endswith(("out.weight", "down.weight")) else 0.02
                p.normal_(0.0, std)
    model.tokenizer = Tokenizer.bytes([])
    model.source = f"random {name} (seed {seed})"
    model = model.eval().requires_grad_(False)
    model.pack_weights()  # as load_model does by default
    return model
