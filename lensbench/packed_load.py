"""Loading a compressed-tensors checkpoint straight into packed modules (`lb.load(folder, packed=True)`).

transformers reads a `pack-quantized` folder (the one `lensbench compress --format compressed-tensors` writes,
also llm-compressor's) by building the dense model and decompressing every weight into it, so the process holds
float weights after all. Here the architecture is built with its parameters on the meta device (no memory), each
quantised linear's int32-packed codes are unpacked once into lensbench's packed layout (`gpu.quant`) and become a
`QuantLinear`, and only the tensors the checkpoint stores dense (embedding, norms, linears it leaves out) are read
as floats. No float copy of a quantised weight exists at any point, so peak memory is the packed bytes, the dense
rest and one linear's codes.

The symmetric integer grid of compressed-tensors (w = q * scale, q signed) is lensbench's symmetric grid exactly:
code q + 2^(bits-1), min -2^(bits-1) * scale (`gpu.quant`), so the packed model computes the checkpoint's values.
Other schemes (asymmetric zero points, activation quantisation, float formats) are refused in one line: load them
without `packed=True` (transformers dequantises them).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .gpu import runtime
from .gpu.modules import QuantEmbedding, QuantLinear
from .gpu.quant import BITS, pack

from .adapters import adapter_for
from .errors import LensbenchError
from .model import Model, describe
from .offload import read, read_index
from .saved import tied_head_key

FORMAT = "pack-quantized"


def is_packed_folder(path: Path) -> bool:
    """Whether `path` holds a compressed-tensors pack-quantized checkpoint (config.json's quantization_config)."""
    return _quant_config(path).get("format") == FORMAT


def _quant_config(path: Path) -> dict:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc if isinstance(qc, dict) else {}


def targets(path: Path) -> dict[str, tuple[int, int]]:
    """{module name: (bits, group size)} of the quantised linears, or a one-line error for what is not supported."""
    qc = _quant_config(path)
    fix = "load it without packed=True (transformers dequantises it)"
    if qc.get("format") != FORMAT:
        raise LensbenchError(f"{path} is not a compressed-tensors pack-quantized checkpoint (format "
                             f"{qc.get('format')!r}): {fix}, or save it with lensbench compress --format "
                             f"compressed-tensors")
    out: dict[str, tuple[int, int]] = {}
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if group.get("input_activations") or group.get("output_activations"):
            raise LensbenchError(f"{path}: {name} quantises activations, which the packed kernels do not; {fix}")
        bits, gs = w.get("num_bits"), w.get("group_size")
        if (w.get("type") != "int" or not w.get("symmetric") or w.get("strategy") != "group" or bits not in BITS
                or not isinstance(gs, int) or gs <= 0 or gs % 8):
            raise LensbenchError(f"{path}: {name} is {w.get('type')} {bits}-bit {w.get('strategy')} "
                                 f"(symmetric={w.get('symmetric')}, group {gs}); the packed loader reads the symmetric "
                                 f"integer grid in groups of a multiple of 8 at {'/'.join(map(str, BITS))} bits: {fix}")
        for target in group.get("targets") or []:
            if target.startswith("re:") or target in ("Linear",):
                raise LensbenchError(f"{path}: {name} targets {target!r}, a pattern; the packed loader reads "
                                     f"checkpoints that name each module (lensbench compress writes them): {fix}")
            out[target] = (bits, gs)
    if not out:
        raise LensbenchError(f"{path}: its quantization_config quantises no module: {fix}")
    return out


def load_packed(path: Path, auto_class, *, dtype: torch.dtype | None = None, device: str = "cpu") -> Model:
    """The model in `path` with every quantised linear a `QuantLinear` holding the stored codes (module docstring);
    `auto_class(config)` is the transformers Auto class that builds it (`lensbench.load` chooses it)."""
    from transformers import AutoConfig, AutoTokenizer  # heavy: transformers, imported when a model is loaded

    if device != "cpu":
        raise LensbenchError(f"packed loading runs on the CPU, not {device}: drop the device, or load without "
                             f"packed=True")
    wanted = targets(path)
    if not any(path.glob("*.safetensors")):
        raise LensbenchError(f"{path} has no .safetensors weight file: save it again with lensbench compress")
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # the modules are built dense (on meta) and swapped here, not by transformers
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    module = meta_model(config, auto_class, dtype)
    # each tensor read into fresh memory (`offload.read`), not through a mapping of the file: the mapping's pages
    # would count in the process's memory while it loads (the whole file, beside the packed copies)
    where = read_index(path)
    done = {n for n in wanted if f"{n}.weight_packed" in where}
    for name in sorted(done):
        _swap(module, name, wanted[name], lambda k, name=name: read(where[f"{name}.{k}"]), set(where), dtype, path)
    quantised = {f"{n}.{k}" for n in done for k in ("weight_packed", "weight_scale", "weight_shape",
                                                    "weight_zero_point", "bias")}
    dense = {key: read(stored, dtype if stored.dtype.is_floating_point else None) for key, stored in where.items()
             if key not in quantised}
    missing_q = sorted(set(wanted) - done)
    if missing_q:
        raise LensbenchError(f"{path}: the config quantises {missing_q[0]} but no weight file holds its "
                             f"weight_packed: save it again with lensbench compress")
    fill_dense(module, dense, path)
    runtime.install(module)  # the thread policy and fused calls that `apply` and `convert` give a model
    tokenizer = AutoTokenizer.from_pretrained(path)
    module.eval()
    info = {"name": path.name, "source": str(path.resolve()), "format": "compressed-tensors, packed",
            **describe(module)}
    return Model(module, tokenizer, adapter_for(module), info)


def _swap(module: nn.Module, name: str, spec: tuple[int, int], get, keys: set[str], dtype, path: Path) -> None:
    """Replace the meta nn.Linear `name` by a QuantLinear of the stored codes and scales."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # optional: compressed-tensors

    bits, gs = spec
    try:
        linear = module.get_submodule(name)
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear):
        raise LensbenchError(f"{path}: the checkpoint quantises {name}, which is no nn.Linear of "
                             f"{type(module).__name__}: save it again with lensbench compress")
    n, k = (int(v) for v in get("weight_shape").tolist())
    if (n, k) != (linear.out_features, linear.in_features):
        raise LensbenchError(f"{path}: {name} is stored as [{n}, {k}] but the config makes it "
                             f"[{linear.out_features}, {linear.in_features}]: save it again with lensbench compress")
    if k % gs:
        raise LensbenchError(f"{path}: {name}'s {k} inputs are no multiple of its group size {gs}")
    half = 1 << (bits - 1)
    codes = (unpack_from_int32(get("weight_packed"), bits, torch.Size((n, k))).to(torch.int16) + half).to(torch.uint8)
    stored = get("weight_scale")
    scales = stored.to(torch.float16)
    if stored.shape != (n, k // gs) or not torch.equal(scales.to(stored.dtype), stored):
        raise LensbenchError(f"{path}: {name}'s scales ({tuple(stored.shape)}, {stored.dtype}) are not float16-exact "
                             f"[{n}, {k // gs}] scales, which the packed format stores: load it without packed=True")
    pad = -k % 8
    if pad:  # the packed format covers K rounded up to 8; padded columns hold code 0 and meet zero activations
        codes = nn.functional.pad(codes, (0, pad))
    pw = pack(codes, scales, (-half * scales.float()).to(torch.float16), bits, gs, (n, k))
    bias = get("bias").to(dtype) if f"{name}.bias" in keys else None
    replace_module(module, name, QuantLinear(pw, bias, dtype))


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def meta_model(config, auto_class, dtype: torch.dtype) -> nn.Module:
    """The architecture of `config` with its parameters on the meta device (no memory); buffers (rotary tables)
    real. `auto_class(config)` is the transformers Auto class that builds it."""
    from accelerate import init_empty_weights  # heavy: accelerate (with transformers), only for packed loading

    with init_empty_weights(include_buffers=False):
        return auto_class(config).from_config(config, dtype=dtype)


def fill_dense(module: nn.Module, tensors: dict[str, torch.Tensor], path: Path,
               fix: str = "save it again with lensbench compress") -> None:
    """The tensors stored dense take the place of the meta parameters; a tied head is tied again. `fix` ends the
    one-line error when the files and the config disagree."""
    missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    head = module.get_output_embeddings()
    tied = tied_head_key(module) if isinstance(head, nn.Linear) else None  # a packed head is not tied again
    packed_keys = {n for n, m in module.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    left = [m for m in missing if m.rpartition(".")[0] not in packed_keys and m != tied]
    if unexpected or left:
        raise LensbenchError(f"{path}: the weight files do not match the config (missing {left[:3]}, unexpected "
                             f"{sorted(unexpected)[:3]}): {fix}")
    if tied:
        head.weight = module.get_input_embeddings().weight
    still = [n for n, p in module.named_parameters() if p.is_meta]
    if still:
        raise LensbenchError(f"{path}: no weight file holds {still[0]}: {fix}")
