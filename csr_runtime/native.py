"""The runtime's CPU kernel (`decode_kernel.c`): a decode step's codes → keys/values in their slots, in one pass.

The torch path of a decode step (unpack, `embedding_bag`, refinement, centre, RoPE, concatenation) runs
~25 operations over every coded vector of every layer; on a CPU each is a pass over memory. `decode_into`
does the same arithmetic, with the same roundings, in one pass, parallel over rows and token blocks.

It is built on first use with the system C compiler (`$CC`, else `cc`) into the cache folder
(`$CSR_CACHE_DIR/native`, ~1 s) and loaded with ctypes: no build step at install time, no torch headers.
Where no compiler is found the runtime takes the torch path, with one warning. `CSR_NATIVE=0` turns it off
(e.g. to compare). CUDA tensors always take the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from csr_core.code_layout import CodeLayout
from csr_core.paths import cache_root
from csr_runtime.code_packing import e3m1_values

__all__ = ["available", "decode_into", "find_compiler"]

_SOURCE = Path(__file__).with_name("decode_kernel.c")
_FORMATS = {"fp16": 0, "fp8": 1, "int8": 2, "e3m1": 3}
# no FMA contraction, so the kernel rounds as the torch path does; then the best of these the compiler takes
_BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off"]
_FLAG_SETS = (["-march=native", "-fopenmp"], ["-fopenmp"], [])  # macOS' clang has no OpenMP: serial there
_BLOCK = 64  # tokens a thread decodes at a time
_library = None  # ctypes.CDLL once built, False when it cannot be


def _cpu_tag() -> str:
    """What `-march=native` compiles for: the CPU's feature flags where Linux lists them."""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def find_compiler() -> list[str] | None:
    """The C compiler command the kernel is built with: `$CC` (which may carry arguments, "ccache gcc"), else the
    first of cc, gcc, clang on PATH; None if there is none."""
    chosen = shlex.split(os.environ.get("CC", ""))
    found = shutil.which(chosen[0]) if chosen else shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return None if found is None else [found, *chosen[1:]]


def _build() -> ctypes.CDLL | None:
    compiler = find_compiler()
    if compiler is None:
        warnings.warn("csr_runtime: no C compiler found (set $CC): decoding takes the slower torch path", stacklevel=3)
        return None
    source = _SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        command = [*compiler, *_BASE_FLAGS, *flags]
        tag = hashlib.sha256(source + " ".join([*command, sys.platform, _cpu_tag()]).encode()).hexdigest()[:16]
        target = cache_root() / "native" / f"csr_decode_{tag}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(f".{os.getpid()}.tmp")  # concurrent builds never load half a file
            result = subprocess.run([*command, str(_SOURCE), "-o", str(partial)], capture_output=True, text=True)
            if result.returncode != 0:
                errors.append(result.stderr.strip()[:300])
                continue
            partial.replace(target)
        return _declare(ctypes.CDLL(str(target)))
    warnings.warn(f"csr_runtime: {compiler[0]} could not build the CPU decode kernel ({errors[-1]}): decoding takes the "
                  "slower torch path", stacklevel=3)
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.csr_decode.restype = ctypes.c_int
    lib.csr_decode.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, ptr, i64, i64,
                               ptr, i64, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64]
    return lib


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    global _library
    if os.environ.get("CSR_NATIVE", "1") == "0":
        return False
    if _library is None:
        _library = _build() or False
    return bool(_library)


_LUTS: dict = {}


def _lut(coef_format: str) -> torch.Tensor:
    """Unscaled value of every coefficient code: e3m1's 32 (sign in bit 4), E4M3's 256; unused otherwise."""
    if coef_format not in _LUTS:
        if coef_format == "e3m1":
            _LUTS[coef_format] = e3m1_values(torch.arange(32, dtype=torch.int32), 1.0)
        elif coef_format == "fp8":
            _LUTS[coef_format] = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        else:
            _LUTS[coef_format] = torch.zeros(1)
    return _LUTS[coef_format]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def decode_into(out: torch.Tensor, codes: torch.Tensor, layout: CodeLayout, scale: torch.Tensor, offline: torch.Tensor,
                extra: torch.Tensor | None = None, *, refine_mask: torch.Tensor | None = None,
                refine_codes: torch.Tensor | None = None, refine_layout: CodeLayout | None = None,
                center: torch.Tensor | None = None, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                ) -> bool:
    """Decode every row's codes into `out` (B, H, n, d) float32, a view whose last dim is contiguous (e.g. the
    coded slots of the step's buffer). codes: (B, n, nbytes) uint8; scale: (B,) each row's coefficient scale;
    offline: (N, w) atoms; extra: (B, M, w) each row's extra atoms (row-local index N + j is extra[b, j]); the
    refinement as the cache stores it; center: (H, d); cos, sin: (B, n, d) to rotate (keys), or their first halves (B, n, d / 2)
    where the two halves are equal (every RoPE of transformers). False when the kernel cannot take these tensors
    (the caller takes the torch path)."""
    B, H, n, d = out.shape
    if not available() or out.device.type != "cpu" or out.dtype != torch.float32 or out.stride(-1) != 1:
        return False
    if codes.shape != (B, n, layout.nbytes) or codes.dtype != torch.uint8:
        raise ValueError(f"codes of shape {tuple(codes.shape)} ({codes.dtype}) do not match {B} rows of {n} codes of "
                         f"{layout.nbytes} bytes (uint8)")
    refined = refine_codes is not None and refine_codes.shape[1] > 0
    contiguous = lambda t: None if t is None else t.float().contiguous()
    offline, extra, center, cos, sin, scale = map(contiguous, (offline, extra, center, cos, sin, scale))
    codes = codes.contiguous()
    mask, rcodes = (refine_mask.contiguous(), refine_codes.contiguous()) if refined else (None, None)
    lut = _lut(layout.coef_format)
    rl = refine_layout if refined else layout
    slots = 0 if extra is None else extra.shape[1]
    status = _library.csr_decode(
        _ptr(codes), B, n, layout.groups, layout.k, layout.index_bits, layout.index_bytes, layout.nbytes,
        _FORMATS[layout.coef_format], _ptr(lut), _ptr(scale), _ptr(offline), offline.shape[0], _ptr(extra), slots,
        offline.shape[1], _ptr(mask), mask.shape[1] if refined else 0, _ptr(rcodes), rcodes.shape[1] if refined else 0,
        rl.k, rl.index_bytes, rl.nbytes, H, _ptr(center), _ptr(cos), _ptr(sin), 0 if cos is None else cos.shape[-1],
        _ptr(out), out.stride(0), out.stride(1), out.stride(2), torch.get_num_threads(), _BLOCK)
    if status == 2:
        atoms = offline.shape[0] + slots
        raise ValueError(f"a code points past the {atoms} atoms of its row: corrupt codes or the wrong dictionary")
    if status == 3:
        raise ValueError(f"the refinement flags name more vectors than the {rcodes.shape[1]} refinement codes a row holds")
    return status == 0

