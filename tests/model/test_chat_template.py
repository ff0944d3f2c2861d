"""Chat templates render exactly as transformers' apply_chat_template renders them."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("jinja2")
from kvcache.model.chat_template import render  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3? Answer with \"quotes\" & <tags>\n\ttabs"}],
    [{"role": "user", "content": "héllo wörld 你好 🎉"}],
]

# Templates exercising what real ones use: loop controls, raise_exception, tojson, namespace, trimming.
TEMPLATES = [
    "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "{{ bos_token }}[{{ m['role'] }}] {{ m['content'] | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}\n  {% set ns.n = ns.n + 1 %}\n"
    "{{ ns.n }}: {{ m.content | trim }}{{ eos_token }}\n{% endfor %}",
]


@pytest.fixture(scope="module")
def hf_tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_template_matches_transformers(real_model, hf_tokenizer, messages, add_generation_prompt):
    ours = real_model.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    assert real_model.tokenizer.encode(ours) == hf_tokenizer(theirs, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_template_features_match_transformers(hf_tokenizer, template, messages):
    theirs = hf_tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                              tokenize=False)
    special = {"bos_token": hf_tokenizer.bos_token, "eos_token": hf_tokenizer.eos_token}
    assert render(template, messages, add_generation_prompt=True, **special) == theirs


def test_bad_conversations_are_refused():
    template = TEMPLATES[0]
    for bad, match in [([], "non-empty list"), ([{"role": "user"}], "'role' and 'content'"),
                       ([{"role": "robot", "content": "x"}], "role 'robot'"), ("hello", "non-empty list")]:
        with pytest.raises(ValueError, match=match):
            render(template, bad)
    with pytest.raises(TypeError, match="must be text"):
        render(template, [{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="refused the conversation: no system"):
        render("{{ raise_exception('no system') }}", [{"role": "user", "content": "x"}])


def test_sandboxed():
    """Templates are untrusted code: no attribute escapes."""
    with pytest.raises(ValueError, match="unsafe"):
        render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
               [{"role": "user", "content": "x"}])


def test_model_without_template():
    from kvcache.model.tokenizer import Tokenizer

    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.bytes().apply_chat_template([{"role": "user", "content": "x"}])
