"""The words and errors the command line and the server share: option help, user errors, loading a
user-named model.  Below both, so the server never imports the CLI."""

from __future__ import annotations

KV_HELP = "the KV cache: a spec such as int8, int4, int4:group=32,residual=128,rotate=1 (kvcache caches)"
MODEL_HELP = "a Hugging Face folder, a .gguf file or a model name (kvcache models); default: the shipped model"
RANDOM_SHAPES = ("gpt2-small", "llama-135m")  # --random: random-weight models of these shapes


class UsageError(Exception):
    """A bad request from the user: reported on one line, exit status 2."""


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a user-named model folder raises on bad input (not a bug)."""
    from safetensors import SafetensorError

    from .model.hub import PullError

    return (OSError, ValueError, SafetensorError, PullError)


def load_for_user(load, model_dir: str | None, *args):
    """``load(model_dir, *args)``, with a bad folder reported as a UsageError naming it."""
    try:
        return load(model_dir, *args)
    except load_errors() as exc:
        raise UsageError(f"cannot load --model {model_dir or '(the shipped model)'}: {exc}") from exc
