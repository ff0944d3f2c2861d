"""Build (once, with gcc) and call the compiled decode kernel of the quantized cache.

The C source ships in the package (qattn.c, plain C99 + OpenMP, no PyTorch
headers, so it compiles in about a second).  It is built for this CPU
(``-march=native``) into ``<cache dir>/kernels/qattn-<hash>.so``, the hash
covering the source, the flags and the CPU's feature flags, and written
atomically.  The library links libgomp by soname, so the process reuses the
OpenMP runtime PyTorch already loaded.  Without a compiler (or with
``KVCACHE_NO_KERNEL=1``) one notice is printed and the PyTorch path is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..model.hub import cache_dir

SOURCE = Path(__file__).with_name("qattn.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c99", "-fno-math-errno",
         "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.append("-mprefer-vector-width=512")  # full-width loops where AVX-512 exists (measured ~10% here)

_library: ctypes.CDLL | None = None
_tried = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise OSError("no C compiler (gcc) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[:500]}")
        os.replace(out, target)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it the first time; None (after one notice) if it cannot be built."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("KVCACHE_NO_KERNEL") == "1":
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_flags().encode()).hexdigest()
    target = cache_dir().parent / "kernels" / f"qattn-{digest[:16]}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except OSError as error:
        print(f"kvcache: quantized-cache kernel unavailable ({error}); using the slower PyTorch path",
              file=sys.stderr)
        return None
    lib.kv_quant_decode.restype = ctypes.c_int
    lib.kv_quant_decode.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int] * 9 + [ctypes.c_void_p] * 2
                                    + [ctypes.c_int] * 2 + [ctypes.c_void_p])
    _library = lib
    return lib


def quant_decode(qg: torch.Tensor, k_codes, k_scale, k_offset, v_codes, v_scale, v_offset, count: int, bits: int,
                 group: int, per_channel: bool, full_k: torch.Tensor | None = None, full_v: torch.Tensor | None = None,
                 full_count: int = 0) -> torch.Tensor:
    """Decode attention of fp32 queries qg (B, H, G, D) (scaled) over ``count`` stored tokens of one layer and
    ``full_count`` full-precision ones: the normalised output (B, H, G, D).

    The storage tensors are one layer's contiguous blocks: key codes and per-token key scales as tiles
    (B, H, capacity/16, W, 16), per-channel key scales (B, H, capacity/group, D), values (B, H, capacity, W);
    ``full_k``/``full_v`` (B, H, full capacity, D) float32, the first ``full_count`` positions used.
    """
    lib = library()
    assert lib is not None, "quant_decode called without a kernel"
    batch, heads, group_q, dim = qg.shape
    out = torch.empty_like(qg)
    fk = full_k.data_ptr() if full_count else None
    fv = full_v.data_ptr() if full_count else None
    status = lib.kv_quant_decode(
        qg.data_ptr(), k_codes.data_ptr(), k_scale.data_ptr(), k_offset.data_ptr(), v_codes.data_ptr(),
        v_scale.data_ptr(), v_offset.data_ptr(), batch, heads, group_q, dim, count, v_codes.shape[2], bits, group,
        int(per_channel), fk, fv, full_count, full_k.shape[2] if full_count else 0, out.data_ptr())
    if status != 0:
        raise MemoryError("the quantized-cache kernel could not allocate its partials")
    return out
