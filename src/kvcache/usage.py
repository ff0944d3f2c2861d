"""The words and errors the command line and the server share: option help, user errors, loading a
user-named model.  Below both, so the server never imports the CLI."""

from __future__ import annotations

KV_HELP = "the KV cache: a spec such as int8, int4, int4:group=32,residual=128,rotate=1 (kvcache caches)"
MODEL_HELP = "a Hugging Face folder, a .gguf file or a model name (kvcache models); default: the shipped model"
RANDOM_SHAPES = ("gpt2-small", "llama-135m")  # --random: random-weight models of these shapes
DTYPE_HELP = ("the dtype the model computes in: auto (the file's own formats where this CPU runs them natively), "
              "float32, bfloat16, float16, float64; or a weight format with float32 activations: Q8_0, Q4_0, Q4_1, "
              "F16 (default: float32)")

FLOAT_ACTIVATIONS_HELP = ("quantized weights (Q8_0, Q4_0, Q4_1): multiply float32 activations, equal to the "
                          "dequantized model, instead of the faster 8-bit ones")


def add_dtype(parser) -> None:
    """--dtype and --float-activations, for every command that loads a model."""
    parser.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    parser.add_argument("--float-activations", action="store_true", help=FLOAT_ACTIVATIONS_HELP)


class UsageError(Exception):
    """A bad request from the user: reported on one line, exit status 2."""


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a user-named model folder raises on bad input (not a bug)."""
    from safetensors import SafetensorError

    from .model.hub import PullError

    return (OSError, ValueError, SafetensorError, PullError)


def check_dtype(dtype: str) -> None:
    """A --dtype value, checked before the (slow) model load."""
    from .model.loader import model_dtype
    from .model.qweight import format_name

    if dtype.strip().lower() != "auto" and not format_name(dtype):
        try:
            model_dtype(dtype)
        except ValueError as exc:
            raise UsageError(f"--dtype: {exc}") from None


def load_user_model(model_dir: str | None, dtype: str = "float32", float_activations: bool = False):
    """The model --model and --dtype name; for any --dtype but float32 a line on stderr says what it computes in."""
    import sys

    from .model.loader import load_model

    model = load_for_user(load_model, model_dir, dtype, True, float_activations)
    if dtype.strip().lower() not in ("float32", "fp32", "float"):
        print(f"kvcache: {model.source} computes in {model.load_note}", file=sys.stderr)
    return model


def load_for_user(load, model_dir: str | None, *args):
    """``load(model_dir, *args)``, with a bad folder reported as a UsageError naming it."""
    try:
        return load(model_dir, *args)
    except load_errors() as exc:
        raise UsageError(f"cannot load --model {model_dir or '(the shipped model)'}: {exc}") from exc
