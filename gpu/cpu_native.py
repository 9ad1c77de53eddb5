"""Decode for packed int4 and int8 on the CPU with integer dot products (`native/vnni.cpp`, AVX512-VNNI).

torch's weight-only kernels (`cpu_torch`) dequantise to bfloat16 and multiply in floating point, rounding the
activations to bfloat16 (8 significant bits); numba's exact gemv multiplies in float32 at a fraction of the
speed. This kernel multiplies integers on lensbench's own packed bytes (no second copy of the weight): the
activations are quantised per group to 16-bit integers (d = max|x| / LEVELS, an error of at most 1.6e-5 of the
group's largest activation), and the codes, unsigned bytes as stored or masked out of their nibbles, are dotted
with them exactly in int32 lanes: at one activation row by VPDPBUSD on the activations split into two signed
bytes, at several by VPDPWSSD on the codes widened to 16-bit words once for every row. The group's
sum is scaled by its scale and d in float32, and its min multiplies the exact float32 sum
of its activations. Outputs agree with the exact float32 kernels within 5e-4 of their largest value (what
tests/test_cpu_native.py checks; the bfloat16 path is allowed 1e-2). `cpu_kernels.set_exact(True)` (or
LENSBENCH_EXACT_KERNELS=1) still keeps every matmul on the float32 kernels, as `evaluate` does.

It runs int4 and int8 weights whose groups all have lengths that are multiples of 32 (group size 32, 64,
128, ... or one group per row, and K padded to a multiple of 32: SmolLM2's K = 576 in groups of 128 ends with
a group of 64; int8 groups at most 4096 long, int4 ones under 65536), for at most `MAX_ROWS` activation rows.
It is C++ compiled on first use with the system's compiler for this CPU (`-march=native`) into
$LENSBENCH_CACHE/native/ (default ~/.cache/lensbench), keyed by the source, torch's version and the
compiler's target, and registered as the torch op `lensbench_native::packed_mm`, which a compiled decode
graph calls from its C++ wrapper without Python. The same library holds `lensbench_native::decode_attention`
(`native/attention.cpp`, AVX-512 float32), the compiled steps' attention (`lensbench.native_attention`), and
`lensbench_native::dequant` (`native/dequant.cpp`), the prefill path's tiles of the weights it holds. Where
it cannot be built (no C++ compiler, a CPU without AVX512-VNNI) `unavailable()` says why and the packed weights
run on the other kernels (the steps on eager attention); LENSBENCH_NATIVE=0 turns it off.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from .quant import PackedWeight

SOURCES = tuple(Path(__file__).parent / "native" / f for f in ("vnni.cpp", "attention.cpp", "dequant.cpp", "dense.cpp"))
# not compiled alone, but part of the build key
HEADERS = tuple(Path(__file__).parent / "native" / f for f in ("packed_format.h", "lanes.h"))
BITS = (4, 8)
INT8_MAX_GROUP = 4096  # longer int8 groups could overflow the kernel's int32 lanes
INT4_MAX_GROUP = 65535  # int4 groups of 65536 or more could too
LEVELS = 32639  # the activations' integer levels either side of zero: d = max|x| / LEVELS (127 * 256 + 127)
# Activation rows it takes: above 24 the tiled dequantise + GEMM path is faster (the crossover table of
# benchmarks/decode.py, reports/DECODE.md). torch's int4 kernel was faster at most row counts from 2 there, but
# its layout is a second copy of the codes, so it is used only for what this kernel does not hold.
MAX_ROWS = 24
_enabled = os.environ.get("LENSBENCH_NATIVE", "1") != "0"
_lock = threading.Lock()
_state: dict = {}  # "error": why it is unavailable, once known


def _cache() -> Path:
    return Path(os.environ.get("LENSBENCH_CACHE", Path.home() / ".cache" / "lensbench")) / "native"


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _command(out: Path) -> list[str]:
    root = Path(torch.__file__).parent
    return [_compiler(), "-O3", "-march=native", "-std=c++20", "-fopenmp", "-shared", "-fPIC", "-DNDEBUG", "-w",
            f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            *map(str, SOURCES), "-o", str(out), f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu",
            f"-Wl,-rpath,{root / 'lib'}"]


def _target() -> str:
    """What -march=native means here (the compiler's version and the CPU features it enables)."""
    try:
        ver = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, timeout=60).stdout
        flags = subprocess.run([_compiler(), "-march=native", "-Q", "--help=target"], capture_output=True,
                               text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"no C++ compiler ({_compiler()}: {e}); install g++ or set CXX") from e
    return ver + flags


def _build() -> Path:
    key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES + HEADERS) + torch.__version__.encode()
                         + _target().encode() + " ".join(_command(Path("x"))).encode()).hexdigest()[:16]
    lib = _cache() / f"lensbench_native-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        run = subprocess.run(_command(Path(tmp)), capture_output=True, text=True, timeout=600)
        if run.returncode:
            lines = [ln for ln in run.stderr.splitlines() if "error" in ln] or run.stderr.splitlines()[-1:]
            raise RuntimeError(lines[0].strip() if lines else f"{_compiler()} failed")
        os.replace(tmp, lib)  # atomic: a concurrent process sees the whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _load() -> bool:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        _state["error"] = f"the native kernel is built on x86-64 Linux only, not {sys.platform} {platform.machine()}"
        return False
    missing = [f.name for f in SOURCES + HEADERS if not f.exists()]
    if missing:
        _state["error"] = f"the native kernel's sources are missing ({', '.join(missing)}): reinstall lensbench"
        return False
    try:
        torch.ops.load_library(str(_build()))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        _state["error"] = f"the native kernel did not build ({e}); decode runs on torch's and numba's kernels"
        return False

    @torch.library.register_fake("lensbench_native::packed_mm")
    def _(x, packed, scales, mins, group, bits):
        return x.new_empty((x.shape[0], packed.shape[0]))

    @torch.library.register_fake("lensbench_native::decode_attention")
    def _(q, k, v, mask, scaling):
        return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3]))

    @torch.library.register_fake("lensbench_native::dense_mm")
    def _(x, w):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("lensbench_native::dequant")
    def _(packed, scales, mins, group, bits, n0, out):
        return None
    _state["loaded"] = True
    return True


def available() -> bool:
    """Whether the kernel is on and built for this machine (building it on the first call)."""
    if not _enabled:
        return False
    with _lock:
        return _load()


def library_available() -> bool:
    """Whether the library's ops besides the packed matmul (the decode attention, the dense float32 matmul) are
    built here (building the library on the first call). LENSBENCH_NATIVE=0 turns them off with the packed matmul
    kernel; `set_enabled` toggles only the packed matmul kernel."""
    if os.environ.get("LENSBENCH_NATIVE", "1") == "0":
        return False
    with _lock:
        return _load()


def attention_ready() -> bool:
    """`library_available()` once the library is loaded (no build, no lock: cheap enough for a traced forward)."""
    return "loaded" in _state


def unavailable() -> str | None:
    """Why the kernel does not run here, or None when it does."""
    if not _enabled:
        return "LENSBENCH_NATIVE=0 turned the native kernel off"
    return None if available() else _state["error"]


def set_enabled(enabled: bool) -> None:
    """Turn the kernel on or off for this process (the decode benchmark compares it with torch's)."""
    global _enabled
    _enabled = bool(enabled)


def holds(pw: PackedWeight) -> bool:
    """Whether the kernel runs `pw`: int4 or int8 with every group's length a multiple of 32 (and within the
    group limits above)."""
    return (pw.bits in BITS and pw.group_size % 32 == 0 and pw.k_padded % 32 == 0
            and pw.group_size <= (INT4_MAX_GROUP if pw.bits == 4 else INT8_MAX_GROUP))


def supported(pw: PackedWeight) -> bool:
    """`holds(pw)` on a machine where the kernel is available (answered once per weight: the decode hot path)."""
    ok = pw.__dict__.get("_native_ok")
    if ok is None:
        ok = pw.__dict__["_native_ok"] = holds(pw)
    return ok and _enabled and ("loaded" in _state or available())


def args(pw: PackedWeight) -> tuple:
    """What `call` takes besides the activations (a compiled graph keeps them as constants)."""
    return (pw.k_padded, pw.packed, pw.scales, pw.mins, pw.group_size, pw.bits)


def call(x2: torch.Tensor, k_padded: int, *weight) -> torch.Tensor:
    """The op on x2 [M, K] float, padded to the codes' K: [M, N] float32."""
    x2 = x2.float()
    if x2.shape[1] != k_padded:
        x2 = torch.nn.functional.pad(x2, (0, k_padded - x2.shape[1]))
    return torch.ops.lensbench_native.packed_mm(x2.contiguous(), *weight)


def _require() -> None:
    """Raise why the library does not run here, unless it is loaded (building it on the first call)."""
    if "loaded" not in _state and not available():
        raise RuntimeError(unavailable())


def dequantize(pw: PackedWeight, n0: int, out: torch.Tensor) -> torch.Tensor:
    """Rows n0 .. n0 + len(out) of `pw` dequantised into `out` ([R, K padded], float32 or bfloat16, rounded to
    nearest even; `native/dequant.cpp`) on torch's threads: the prefill path's tiles."""
    _require()
    torch.ops.lensbench_native.dequant(pw.packed, pw.scales, pw.mins, pw.group_size, pw.bits, n0, out)
    return out


def matmul(x2: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """x2 [M, K] float -> [M, N] float32 (activations rounded to 16-bit integers per group)."""
    _require()
    return call(x2, *args(pw))
