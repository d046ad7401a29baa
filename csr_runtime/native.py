"""The runtime's CPU kernels (`decode_kernel.c`), each one pass over the packed codes, parallel over rows and tokens.

- `decode_into`: codes → keys (rotated) / values in their slots of the step's buffer. The torch path of a decode
  step (unpack, `embedding_bag`, refinement, centre, RoPE, concatenation) runs ~25 operations over every coded
  vector of every layer; on a CPU each is a pass over memory. Same arithmetic, same roundings.
- `key_scores`: q · k for every coded key, each key decoded and rotated in registers and never stored (the
  "csr_codes" attention, `attention.py`).
- `weighted_values`: Σ_t w_t v_t over the coded values as codes: each pair adds w_t · coef to its atom's weight,
  then one product with the atoms.
- `mp_gram`: matching pursuit through the Gram matrix (`sparse_coding._mp_gram_batch`: one product with the
  dictionary per call instead of one per atom), each row's atoms chosen while its scores stay in cache.
- `mp_amx`: `mp_gram` with the product X Dᵀ made in the kernel on the CPU's matrix unit (Intel AMX, bf16 tiles,
  float32 sums of three bf16 products), 16 vectors at a time, each block's scores coded while they are in L2,
  through an int16 Gram matrix (made on the tiles too, `amx_dictionary`).
- `pack_e3m1`: a coding call's codes packed into their bytes (`code_packing.pack_codes`' ~10 tensor operations).
- `residual_energy`: ‖x − x̂‖² of coded vectors, for the refinement's ranking, without storing x̂ or x − x̂.
- `mp_direct`: matching pursuit of a few vectors (a decode step's), every score computed in registers, four
  vectors sharing each load of the atoms: a call of 24 vectors took ~60 tensor operations on the torch path.

It is built on first use with the system C compiler (`$CC`, else `cc`) into the cache folder
(`$CSR_CACHE_DIR/native`, ~8 s on a 2-core machine) and loaded with ctypes: no build step at install time, no
torch headers. Key scores and value weights of a code layout other than the one the base build is specialised for
come from one more build for that layout (`_library_for`; `CSR_KERNEL_INSTANCES=0` turns that off).
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
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from csr_core.code_layout import CodeLayout
from csr_core.paths import cache_root
from csr_runtime.code_packing import _field_tensors, e3m1_levels, e3m1_values

__all__ = ["PackedCodes", "amx_available", "applies", "available", "decode_into", "find_compiler", "key_scores", "mp_amx",
           "mp_direct", "mp_gram", "amx_dictionary", "AmxDictionary", "pack_e3m1", "residual_energy", "weighted_values",
           "workspace"]

_SOURCE = Path(__file__).with_name("decode_kernel.c")
_FORMATS = {"fp16": 0, "fp8": 1, "int8": 2, "e3m1": 3}
# no FMA contraction, so the kernel rounds as the torch path does; then the best of these the compiler takes
_BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off"]
_FLAG_SETS = (["-march=native", "-fopenmp"], ["-fopenmp"], [])  # macOS' clang has no OpenMP: serial there
_BLOCK = 64  # tokens a thread decodes at a time
_OP_DECODE, _OP_SCORE = 0, 1  # csr_decode's ops (decode_kernel.c)
_library = None  # ctypes.CDLL once built, False when it cannot be
# The layout (groups, k, index bits, refinement k) of the base library's kernel instance (decode_kernel.c's default
# CSR_INSTANCE, read from the library once), and the libraries built for other layouts (`_library_for`), None where
# that build failed.
_base_instance: tuple[int, int, int, int] | None = None
_instances: dict[tuple[int, int, int, int], ctypes.CDLL | None] = {}
_amx: bool | None = None  # whether the base library has AMX kernels and Linux grants this process the tile state


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


def _build(instance: tuple[int, ...] | None = None) -> ctypes.CDLL | None:
    """Build (or load the cached build of) the kernel library; `instance`: the layout its kernel instance is for
    (decode_kernel.c's CSR_INSTANCE), None for the base library's."""
    compiler = find_compiler()
    if compiler is None:
        warnings.warn("csr_runtime: no C compiler found (set $CC): decoding takes the slower torch path", stacklevel=3)
        return None
    source = _SOURCE.read_bytes()
    errors = []
    defines = [] if instance is None else [f"-DCSR_INSTANCE={','.join(map(str, instance))}"]
    for flags in _FLAG_SETS:
        command = [*compiler, *_BASE_FLAGS, *flags, *defines]
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
    if instance is not None:
        warnings.warn(f"csr_runtime: {compiler[0]} could not build the kernel instance for code layout {instance} "
                      f"({errors[-1]}): the base kernels serve it", stacklevel=3)
    else:
        warnings.warn(f"csr_runtime: {compiler[0]} could not build the CPU decode kernel ({errors[-1]}): decoding takes "
                      "the slower torch path", stacklevel=3)
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.csr_decode.restype = ctypes.c_int
    lib.csr_decode.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, ptr, i64, i64,
                               ptr, i64, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64, ptr, i64, i64,
                               i64, i64, i64, ptr, i64, i64]
    lib.csr_value_weights.restype = ctypes.c_int
    lib.csr_value_weights.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr, i64, ptr, i64,
                                      i64, i64, i64, i64, i64, ptr, i64, ptr, i64, i64, i64]
    lib.csr_mp_gram.restype = None
    lib.csr_mp_gram.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, ctypes.c_float, i64]
    lib.csr_instance.restype = None
    lib.csr_instance.argtypes = [ptr]
    lib.csr_mp_amx.restype = ctypes.c_int
    lib.csr_mp_amx.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ctypes.c_float, i64, ptr, ptr, ptr, ptr, i64,
                               ctypes.c_float, i64]
    lib.csr_amx_gram.restype = ctypes.c_int
    lib.csr_amx_gram.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_float, i64]
    lib.csr_amx_pack_atoms.restype = None
    lib.csr_amx_pack_atoms.argtypes = [ptr, i64, i64, ptr]
    lib.csr_amx_ready.restype = ctypes.c_int
    lib.csr_pack_e3m1.restype = ctypes.c_int
    lib.csr_pack_e3m1.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64, ptr, i64]
    lib.csr_mp_direct.restype = None
    lib.csr_mp_direct.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ctypes.c_float, i64]
    lib.csr_residual_energy.restype = None
    lib.csr_residual_energy.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i64]
    return lib


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    global _library
    if os.environ.get("CSR_NATIVE", "1") == "0":
        return False
    if _library is None:
        _library = _build() or False
    return bool(_library)


def _library_for(packed: "PackedCodes") -> ctypes.CDLL:
    """The library whose key-score and value kernels have an instance for these codes' layout: the base library
    where its instance fits (SmolLM2's default layout) or where the layout gets none — coefficients other than
    e3m1, dictionaries under 1024 atoms (toy layouts), `CSR_KERNEL_INSTANCES=0`; otherwise one built for the layout
    on first use (a few seconds, once per machine: the build is cached like the base one), the base library where
    that build fails. The caller checks `available()`."""
    global _base_instance
    layout, refine = packed.layout, packed.refine_layout
    key = (layout.groups, layout.k, layout.index_bits, refine.k if refine is not None else 0)
    worth = (layout.coef_format == "e3m1" and layout.index_bits >= 10 and os.environ.get("CSR_KERNEL_INSTANCES") != "0"
             and (refine is None or refine.index_bits == layout.index_bits))
    if not worth:
        return _library
    if _base_instance is None:
        _base_instance = instance_layout(_library)
    if key == _base_instance or (refine is None and key[:3] == _base_instance[:3]):  # no refinement: any rk serves
        return _library
    if key not in _instances:
        _instances[key] = _build(key)
    return _instances[key] or _library


def instance_layout(library: ctypes.CDLL) -> tuple[int, int, int, int]:
    """The layout (groups, k, index bits, refinement k) a library's kernel instance is for."""
    out = torch.zeros(4, dtype=torch.int64)
    library.csr_instance(_ptr(out))
    return tuple(out.tolist())


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


@dataclass(frozen=True)
class PackedCodes:
    """One kind's codes (keys or values) of one layer as the cache holds them: what the kernels read.

    codes: (B, n, nbytes) uint8; scale: (B,) each row's coefficient scale; offline: (N, w) atoms; extra: (B, M, w)
    each row's extra atoms (row-local index N + j is extra[b, j]); the refinement as the cache stores it (a flag
    bit per coded vector, the refined vectors' codes in order); center: (H, d) μ."""

    codes: torch.Tensor
    layout: CodeLayout
    scale: torch.Tensor
    offline: torch.Tensor
    extra: torch.Tensor | None = None
    refine_mask: torch.Tensor | None = None
    refine_codes: torch.Tensor | None = None
    refine_layout: CodeLayout | None = None
    center: torch.Tensor | None = None

    @property
    def n_coded(self) -> int:
        return self.codes.shape[1]

    @property
    def atoms(self) -> int:
        """Atoms a row's indices may name: the offline ones and the row's extra slots."""
        return self.offline.shape[0] + (0 if self.extra is None else self.extra.shape[1])

    def _arguments(self) -> tuple[list, list, list]:
        """The codes' part of the kernels' arguments: (before the atoms, the refinement, the tensors the pointers
        point into — the caller holds them until the kernel returns)."""
        refined = self.refine_codes is not None and self.refine_codes.shape[1] > 0
        codes, scale = self.codes.contiguous(), self.scale.float().contiguous()
        mask, rcodes = (self.refine_mask.contiguous(), self.refine_codes.contiguous()) if refined else (None, None)
        layout, rl = self.layout, self.refine_layout if refined else self.layout
        if codes.dtype != torch.uint8 or codes.shape[2] != layout.nbytes:
            raise ValueError(f"codes of shape {tuple(codes.shape)} ({codes.dtype}) are not {layout.nbytes}-byte codes "
                             "(uint8)")
        return [_ptr(codes), codes.shape[0], codes.shape[1], layout.groups, layout.k, layout.index_bits,
                layout.index_bytes, layout.nbytes, _FORMATS[layout.coef_format], _ptr(_lut(layout.coef_format)),
                _ptr(scale)], [_ptr(mask), mask.shape[1] if refined else 0, _ptr(rcodes),
                               rcodes.shape[1] if refined else 0, rl.k, rl.index_bytes, rl.nbytes], \
            [codes, scale, mask, rcodes]


def _check(status: int, packed: PackedCodes) -> bool:
    """False where the kernel declined (a head or code larger than its buffers); an error for corrupt codes."""
    if status == 2:
        raise ValueError(f"a code points past the {packed.atoms} atoms of its row: corrupt codes or the wrong dictionary")
    if status == 3:
        raise ValueError(f"the refinement flags name more vectors than the {packed.refine_codes.shape[1]} refinement "
                         "codes a row holds")
    return status == 0


def _run_decode(packed: PackedCodes, H: int, out: torch.Tensor, strides, op: int, G: int, query, cos, sin) -> int:
    contiguous = lambda t: None if t is None else t.float().contiguous()
    offline, extra, center, cos, sin, query = map(contiguous, (packed.offline, packed.extra, packed.center, cos, sin,
                                                               query))
    head, refinement, _held = packed._arguments()
    slots = 0 if extra is None else extra.shape[1]
    library = _library_for(packed) if op == _OP_SCORE else _library  # layout instances serve the key scores only
    return library.csr_decode(
        *head, _ptr(offline), offline.shape[0], _ptr(extra), slots, offline.shape[1], *refinement, H, _ptr(center),
        _ptr(cos), _ptr(sin), 0 if cos is None else cos.shape[-1],
        0 if cos is None or cos.shape[0] == 1 else cos.shape[1] * cos.shape[2], _ptr(out), *strides, op, G, _ptr(query),
        torch.get_num_threads(), _BLOCK)


def decode_into(out: torch.Tensor, packed: PackedCodes, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None) -> bool:
    """Decode every row's codes into `out` (B, H, n, d) float32, a view whose last dim is contiguous (e.g. the
    coded slots of the step's buffer). cos, sin: (B, n, d) to rotate (keys), or their first halves (B, n, d / 2)
    where the two halves are equal (every RoPE of transformers); (1, n, ·) when every row has the same positions.
    False when the kernel cannot take these tensors (the caller takes the torch path)."""
    B, H, n, _ = out.shape
    if not available() or out.device.type != "cpu" or out.dtype != torch.float32 or out.stride(-1) != 1:
        return False
    if packed.codes.shape[:2] != (B, n):
        raise ValueError(f"codes of shape {tuple(packed.codes.shape)} do not match {B} rows of {n} codes")
    status = _run_decode(packed, H, out, (out.stride(0), out.stride(1), out.stride(2)), _OP_DECODE, 0, None, cos,
                         sin)
    return _check(status, packed)


def applies(packed: PackedCodes) -> bool:
    """Whether the kernels can read these codes: built, on the CPU, float32 atoms. `key_scores` and `weighted_values`
    take only such codes (the caller checks)."""
    return available() and packed.codes.device.type == "cpu" and packed.offline.dtype == torch.float32


def _require(packed: PackedCodes, *tensors: torch.Tensor) -> None:
    if not applies(packed) or any(t.device.type != "cpu" for t in tensors):
        raise ValueError("the CPU kernels cannot read these codes (no compiler, CSR_NATIVE=0 or CUDA tensors): check "
                         "native.applies() first and take the PyTorch path")


def _run_or_raise(status: int, packed: PackedCodes) -> None:
    if not _check(status, packed):
        raise ValueError("a head of over 1024 channels or a code of over 1024 pairs: more than the CPU kernels hold")


_workspace = threading.local()


def workspace(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 CPU buffer of `shape` kept per thread and name for the next call of the same shape: for temporaries
    never handed back to a caller (at 69 rows × 8k a layer's scores are 20 MB, and freshly allocated memory costs a
    page fault per 4 KB on every call). Uninitialised; a fresh tensor while autograd records (it may keep it)."""
    if torch.is_grad_enabled():
        return torch.empty(shape, dtype=torch.float32)
    held = getattr(_workspace, name, None)
    if held is None or held.shape != torch.Size(shape):
        held = torch.empty(shape, dtype=torch.float32)
        setattr(_workspace, name, held)
    return held


def _row_stride(t: torch.Tensor) -> int | None:
    """The stride from one row to the next of a (B, H, R, n) float32 tensor whose rows are evenly spaced with
    contiguous elements (e.g. a slice of the last dim of a contiguous tensor); None otherwise."""
    B, H, R, _ = t.shape
    rs = t.stride(2)
    even = t.stride(3) == 1 and (H == 1 or t.stride(1) == R * rs) and (B == 1 or t.stride(0) == H * R * rs)
    return rs if even and t.dtype == torch.float32 and t.device.type == "cpu" else None


def key_scores(packed: PackedCodes, query: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """query: (B, H, G, d) one query per head, the G query heads of each KV head, already scaled → (B, H, G, n) float32
    q · k_t for every coded key k_t, each decoded (and rotated by cos/sin as in `decode_into`) inside the kernel and
    never stored. `out`: where to write them, a (B, H, G, n) float32 view with evenly spaced rows (the coded slots
    of the whole score tensor: no concatenation afterwards)."""
    _require(packed, query)
    B, H, G, _ = query.shape
    scores = torch.empty(B, H, G, packed.n_coded, dtype=torch.float32) if out is None else out
    rs = _row_stride(scores)
    if scores.shape != (B, H, G, packed.n_coded) or rs is None:
        raise ValueError(f"key_scores: out must be a ({B}, {H}, {G}, {packed.n_coded}) float32 CPU view with evenly "
                         f"spaced contiguous rows, got {tuple(scores.shape)} with strides {scores.stride()}")
    _run_or_raise(_run_decode(packed, H, scores, (0, 0, rs), _OP_SCORE, G, query, cos, sin), packed)
    return scores


def weighted_values(packed: PackedCodes, weights: torch.Tensor) -> torch.Tensor:
    """weights: (B, H, G, n) attention weights of the coded slots → Σ_t w_t v_t (B, H, G, d) float32, values aggregated
    as codes: each pair adds w_t · coef to its atom's weight (the kernel), then one product with the atoms (BLAS)
    and μ Σ_t w_t."""
    _require(packed, weights)
    B, H, G, n = weights.shape
    threads = torch.get_num_threads()
    parts = max(1, min(threads // B, n // 256))  # rows in parallel; a row's tokens split where rows are fewer
    s_n, atoms, N = packed.layout.groups // H, packed.atoms, packed.offline.shape[0]
    slots = -(-max(G, 4) // 4) * 4  # an atom's G weights padded to whole 4-float vectors (one update a pair)
    a = workspace("value_weights", (parts, B, H, s_n, atoms, slots)).zero_()
    row_stride = _row_stride(weights)  # read in place where the rows are evenly spaced (the coded slots' weights)
    if row_stride is None:
        weights, row_stride = weights.float().contiguous(), n
    head, refinement, _held = packed._arguments()
    _run_or_raise(_library_for(packed).csr_value_weights(*head, atoms, *refinement, H, G, _ptr(weights), row_stride, _ptr(a),
                                             slots, parts, threads), packed)
    # (B, H, s_n, G, atoms), contiguous: one BLAS product (on the strided view torch's matmul takes twice as long)
    a = (a.sum(0) if parts > 1 else a[0])[..., :G].transpose(-1, -2).contiguous()
    out = a[..., :N] @ packed.offline.float()
    if atoms > N:  # each row's own extra atoms
        out += (a[..., N:].reshape(B, -1, atoms - N) @ packed.extra.float()).view(out.shape)
    out = out.transpose(2, 3).reshape(B, H, G, -1)  # chunks side by side
    if packed.center is not None:
        out += weights.sum(-1, keepdim=True) * packed.center.float()[None, :, None]
    return out


def _levels(rounding, kernel: str):
    """e3m1's levels and midpoints for the MP kernels' rounding (None, None without rounding)."""
    if rounding is None:
        return None, None
    if getattr(rounding, "coef_format", None) != "e3m1":
        raise ValueError(f"{kernel} rounds coefficients to e3m1 only, got {rounding!r}: use sparse_encode")
    return e3m1_levels()


def amx_available() -> bool:
    """Whether `mp_amx` runs here: the kernel built with AMX (`-march=native` on a CPU that has it: Intel Xeon since
    Sapphire Rapids) and Linux granting the process the tiles' state. `CSR_AMX=0` turns it off (e.g. to compare)."""
    global _amx
    if os.environ.get("CSR_AMX", "1") == "0" or not available():
        return False
    if _amx is None:
        _amx = bool(_library.csr_amx_ready())
    return _amx


@dataclass(frozen=True)
class AmxDictionary:
    """A dictionary as `mp_amx` reads it: its atoms (N, d) in bf16 hi and lo parts laid out as tiles, N and d padded
    with zeros to multiples of 32 (decode_kernel.c, csr_amx_pack_atoms), and its Gram matrix D Dᵀ as int16,
    G ≈ gram_scale · gram (half the bytes of float32; its error under 2⁻¹⁶ of max ‖d_i‖²). `atoms_bf16`: every atom
    value is a bf16 value (lo parts zero, as `neuraldict` exports them): the kernel then makes two bf16 products where
    it made three, with the same result."""

    packed: torch.Tensor
    gram: torch.Tensor
    gram_scale: float
    atoms_bf16: bool

    @property
    def n_atoms(self) -> int:
        return self.gram.shape[0]


def amx_dictionary(dictionary: torch.Tensor, reuse: AmxDictionary | None = None) -> AmxDictionary | None:
    """`dictionary` (N, d) packed for `mp_amx`, its Gram matrix made on the tiles too; None where a thread's buffers
    could not be allocated. `reuse`: one the caller no longer needs, of the same shapes, whose memory is overwritten
    (fresh memory faults its pages in: half the Gram matrix's time). The caller checks `amx_available()`."""
    N, d = dictionary.shape
    atoms = dictionary.float().contiguous()
    size = 2 * (-(-N // 32) * 32) * (-(-d // 32) * 32)
    fits = reuse is not None and reuse.packed.numel() == size and reuse.n_atoms == N
    packed = reuse.packed if fits else torch.empty(size, dtype=torch.int16)
    _library.csr_amx_pack_atoms(_ptr(atoms), N, d, _ptr(packed))
    atoms_bf16 = not bool(packed[size // 2 :].any())  # no lo part: the atoms are bf16 values
    gram_scale = float(atoms.square().sum(1).max()) * (1 + 2**-10) / 32767  # |G_ij| <= max ‖d_i‖²
    gram = reuse.gram if fits else torch.empty(N, N, dtype=torch.int16)
    if gram_scale == 0 or _library.csr_amx_gram(_ptr(atoms), N, d, _ptr(packed), atoms_bf16, _ptr(gram), gram_scale,
                                                torch.get_num_threads()):
        return None
    return AmxDictionary(packed, gram, gram_scale, atoms_bf16)


def mp_amx(x: torch.Tensor, dictionary: AmxDictionary, s: int, rounding=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Matching pursuit of every row of x (n, d) as `mp_gram` of X Dᵀ, the product made in the kernel (AMX, bf16x3:
    within ~2⁻¹⁷ |x| of float32's scores) and the scores updated through the int16 Gram matrix (within 2⁻¹⁶ |c|):
    the same atoms as float32 but at near-ties. `dictionary` from `amx_dictionary` → idx (n, s) int64, coef (n, s);
    None where a thread's buffers could not be allocated (the caller takes `mp_gram`). The caller checks
    `amx_available()`."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError("mp_amx takes float32 CPU vectors")
    x = x.contiguous()
    n = x.shape[0]
    idx, coef = torch.empty(n, s, dtype=torch.int64), torch.empty(n, s, dtype=torch.float32)
    levels, midpoints = _levels(rounding, "mp_amx")
    failed = _library.csr_mp_amx(_ptr(x), n, x.shape[1], _ptr(dictionary.packed), dictionary.n_atoms,
                                 dictionary.atoms_bf16, _ptr(dictionary.gram), dictionary.gram_scale, s, _ptr(idx),
                                 _ptr(coef), _ptr(levels), _ptr(midpoints), 0 if levels is None else len(levels),
                                 1.0 if rounding is None else rounding.scale, torch.get_num_threads())
    return None if failed else (idx, coef)


def pack_e3m1(idx: torch.Tensor, coef: torch.Tensor, layout: CodeLayout,
              scale: float | torch.Tensor = 1.0) -> torch.Tensor | None:
    """`code_packing.pack_codes` for e3m1 codes in one kernel call (the same bytes): idx, coef (n, groups, k) →
    (n, nbytes) uint8; scale a float or (n, 1, 1) per code. None where the kernel does not take these (the caller
    takes `pack_codes`). The caller checks `available()`."""
    n, G, k = idx.shape
    if (layout.coef_format != "e3m1" or idx.device.type != "cpu" or (G, k) != (layout.groups, layout.k)
            or layout.nbytes != layout.index_bytes):
        return None
    byte, shift, _ = _field_tensors(layout, idx.device)  # pack_codes' own offsets (int64) and shifts (int32)
    idx, coef = idx.to(torch.int64).contiguous(), coef.float().contiguous()
    scales = (scale.float().reshape(n) if isinstance(scale, torch.Tensor) else torch.full((n,), float(scale))).contiguous()
    out = torch.empty(n, layout.nbytes, dtype=torch.uint8)
    _, midpoints = e3m1_levels()
    status = _library.csr_pack_e3m1(_ptr(idx), _ptr(coef), _ptr(scales), n, G * k, layout.index_bits, _ptr(byte),
                                    _ptr(shift), layout.nbytes, _ptr(midpoints), len(midpoints) + 1, _ptr(out),
                                    torch.get_num_threads())
    if status == 1:
        raise ValueError(f"index {int(idx.max())} does not fit in index_bits = {layout.index_bits}")
    return out if status == 0 else None


def residual_energy(x: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """‖x − Σ_g coef_g · atoms[idx_g]‖² of every row in one pass: x (n, d), idx, coef (n, s), atoms (N, d), float32 on
    the CPU → (n,) float32. The caller checks `available()`."""
    n, d = x.shape
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= atoms.shape[0]):
        raise ValueError(f"indices must lie in [0, {atoms.shape[0]}), got {int(idx.min())}..{int(idx.max())}")
    x, atoms = x.float().contiguous(), atoms.float().contiguous()
    idx, coef = idx.to(torch.int64).contiguous(), coef.float().contiguous()
    out = torch.empty(n, dtype=torch.float32)
    _library.csr_residual_energy(_ptr(x), n, d, _ptr(idx), _ptr(coef), idx.shape[1], _ptr(atoms), _ptr(out),
                                 torch.get_num_threads())
    return out


def mp_direct(x: torch.Tensor, atoms_t: torch.Tensor, s: int, rounding=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching pursuit of every row of x (n, d) over the atoms given as columns, `atoms_t` (d, N) = Dᵀ (float32,
    contiguous): s atoms a row, every score of each residual computed in the kernel (no Gram matrix, no (n, N)
    tensor; for the few vectors of a decode step) → idx (n, s) int64, coef (n, s). `rounding` as in `mp_gram`.
    The caller checks `available()`."""
    for name, t in (("x", x), ("atoms_t", atoms_t)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"mp_direct takes contiguous float32 CPU tensors; {name} is not")
    (n, d), N = x.shape, atoms_t.shape[1]
    if atoms_t.shape[0] != d or d > 1024:
        raise ValueError(f"mp_direct: x is {tuple(x.shape)} but atoms_t is {tuple(atoms_t.shape)} (d ≤ 1024)")
    idx, coef = torch.empty(n, s, dtype=torch.int64), torch.empty(n, s, dtype=torch.float32)
    levels, midpoints = _levels(rounding, "mp_direct")
    _library.csr_mp_direct(_ptr(x), n, d, _ptr(atoms_t), N, s, _ptr(idx), _ptr(coef), _ptr(levels), _ptr(midpoints),
                           0 if levels is None else len(levels), 1.0 if rounding is None else rounding.scale,
                           torch.get_num_threads())
    return idx, coef


def mp_gram(scores: torch.Tensor, gram: torch.Tensor, s: int, rounding=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching pursuit of every row of `scores` (n, N) = X Dᵀ (float32, contiguous; overwritten) through `gram`
    (N, N) = D Dᵀ: s atoms a row, each row's scores kept in cache while its atoms are chosen → idx (n, s) int64,
    coef (n, s). `rounding`: None, or e3m1 rounding (`code_packing.CoefficientRounding`), applied to each coefficient
    before the next atom is chosen (error feedback). The caller checks `available()`."""
    n, N = scores.shape
    if scores.dtype != torch.float32 or not scores.is_contiguous() or scores.device.type != "cpu":
        raise ValueError("mp_gram takes contiguous float32 CPU scores")
    gram = gram.float().contiguous()
    idx, coef = torch.empty(n, s, dtype=torch.int64), torch.empty(n, s, dtype=torch.float32)
    levels, midpoints = _levels(rounding, "mp_gram")
    _library.csr_mp_gram(_ptr(scores), n, N, _ptr(gram), s, _ptr(idx), _ptr(coef), _ptr(levels), _ptr(midpoints),
                         0 if levels is None else len(levels), 1.0 if rounding is None else rounding.scale,
                         torch.get_num_threads())
    return idx, coef
