"""The native CPU kernels (csrc/*.c): built at first use, loaded once, declared in one table.

  - csrc/paged_attention.c: decode attention that reads the paged KV cache in place
    (runtime/paged_attention.py: paged_decode);
  - csrc/rope_cache.c: RoPE and the cache write of a layer's fused q/k/v (paged_attention.py:
    rope_and_cache);
  - csrc/norm_act.c: RMSNorm (after a residual add, if given) and SwiGLU's silu(gate) * up
    (runtime/norm_act.py), which runtime/layers.py takes at inference on CPU;
  - csrc/exit_head.c: the exit head's score in one call (norm_act.py: exit_scores), which
    runtime/model.py's ExitHead takes at inference on CPU, and a step's exit adapters in one call
    (runtime/exit_adapters.py);
  - csrc/causal_softmax.c: the causal mask and softmax of a block of attention scores in one pass
    (runtime/attention.py: grouped_attention);
  - csrc/linear_rows.c: a linear layer on a few rows that streams its weight once (runtime/layers.py);
  - csrc/decode_layer.c: a whole layer on the rows of a decode step, calling the kernels above in one
    call (runtime/decode_layer.py), which the engine's executor takes where each piece would be native;
  - csrc/flash_attention.c: causal flash attention of bf16 prompts and chunks, on AMX tiles or in AVX-512
    BF16 vectors, where the CPU has either (runtime/flash_attention.py; runtime/attention.py: "flash").

The library is compiled with the host's C compiler (`cc`, or $CC) and -march=native, so it vectorizes
for the CPU it runs on, and cached under $PONDER_KERNEL_CACHE (default ~/.cache/ponder/kernels) by a
hash of its sources, the compiler, its flags and the CPU's flags. Without a compiler, or with
PONDER_NATIVE_KERNELS=0, `library()` is None and every caller keeps its torch kernels. CPU only;
fp32 and bf16.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("paged_attention.c", "rope_cache.c", "norm_act.c", "exit_head.c",
                                    "causal_softmax.c", "linear_rows.c", "flash_attention.c",
                                    "decode_layer.c")]
# OpenMP binds to the libgomp torch has loaded (same soname); the kernels' exp is their own, vectorized.
# -fno-trapping-math: no code reads floating-point exception flags, and with them kept gcc vectorizes
# no loop with a floor or a select of products (silu_mul ran scalar, 5-9x slower than torch). It
# changes no rounding (unlike -ffast-math, which would also reassociate sums).
# On x86, gcc vectorizes with 256-bit registers unless told otherwise; 512-bit ones ran the bf16 silu_mul
# 1.3x faster on one AVX-512 CPU (a preference only: CPUs without AVX-512 keep their widths).
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fPIC", "-shared",
          *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()))
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}  # the element types, as each function's name ends

_p, _i, _i64, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
SIGNATURES = {  # name without its type suffix -> (restype, argtypes[, the suffixes it has: default all])
    "paged_decode": (_i, [_p] * 4 + [_i64, _p, _p] + [_i] * 4 + [_i64, _i64, _f, _i]),
    "rope_and_cache": (_i, [_p] * 7 + [_i64] + [_i] * 3 + [_i64, _i]),
    "rms_norm": (None, [_p] * 5 + [_i64, _i, _f, _i]),
    "silu_mul": (None, [_p] * 2 + [_i64, _i, _i]),
    "exit_scores": (_i, [_p, _p, _f] + [_p] * 6 + [_i64, _i, _i, _i]),
    "exit_adapters": (_i, [_p, _p, _i64, _i, _i, _p, _i64] + [_p] * 4 + [_i]),
    "causal_softmax": (_i, [_p, _i64, _i, _i, _i64, _i]),
    "linear_rows": (None, [_p] * 4 + [_i64, _i, _i64, _i]),
    "decode_layer": (_i, [_p, _p, _f] + [_p] * 6 + [_i64, _p, _i64, _p, _i64, _p, _i64, _p, _p, _f] + [_p] * 4
                     + [_i64] + [_i] * 5 + [_f, _i]),
    "causal_flash_attention": (_i, ([_p] + [_i64] * 3) * 3 + [_p] + [_i64] * 3 + [_i] * 6 + [_f, _i], ("bf16",)),
    "paged_causal_flash_attention": (_i, [_p] * 5 + [_i64] + [_p] * 3 + [_i] * 5 + [_i64, _f, _i], ("bf16",)),
}
PLAIN = {"flash_attention_unit": (_i, [])}  # functions of no element type


def available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the native kernels run for tensors of this dtype on this device."""
    return device.type == "cpu" and dtype in SUFFIX and library() is not None


def traced() -> bool:
    """Whether torch is tracing, exporting or compiling: native calls (and prepacked weights) are opaque
    to those, so they take torch's ops."""
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())


def kernel(name: str, dtype: torch.dtype):
    """The library's function `name` for elements of dtype (call `available` first)."""
    return getattr(library(), f"{name}_{SUFFIX[dtype]}")


@cache
def library() -> ctypes.CDLL | None:
    if os.environ.get("PONDER_NATIVE_KERNELS", "1") == "0":
        log.info("native kernels off (PONDER_NATIVE_KERNELS=0): attention, norms and activations run as torch kernels")
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, subprocess.CalledProcessError) as e:
        why = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        log.warning("native kernels not built (%s); attention, norms and activations run as torch kernels", why)
        return None
    for name, (restype, argtypes, *suffixes) in SIGNATURES.items():
        for suffix in suffixes[0] if suffixes else SUFFIX.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.restype, fn.argtypes = restype, argtypes
    for name, (restype, argtypes) in PLAIN.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def build() -> Path:
    """The compiled library, built now if these sources, compiler and CPU have none in the cache."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise FileNotFoundError("no C compiler (cc or gcc, or $CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    sources = b"".join(path.read_bytes() for path in [*SOURCES, *sorted(CSRC.glob("*.h"))])
    key = hashlib.sha256(sources + " ".join([version, *CFLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    cache_dir = Path(os.environ.get("PONDER_KERNEL_CACHE", Path.home() / ".cache" / "ponder" / "kernels"))
    lib = cache_dir / f"ponder-kernels-{key}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # built aside, then renamed: processes may race
        built = Path(tmp) / lib.name
        command = [cc, *CFLAGS, *map(str, SOURCES), "-o", str(built), "-lm"]
        subprocess.run(command, capture_output=True, text=True, check=True)
        built.rename(lib)
    log.info("built %s", lib)
    return lib


def _cpu_flags() -> str:
    try:
        return next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return ""
