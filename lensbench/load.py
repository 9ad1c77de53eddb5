"""`load(source)`: every way a model reaches lensbench, resolved to one `Model`.

Sources, tried in this order:
  * an nn.Module handed in from a notebook (a Hugging Face model, a TransformerLens
    `TransformerBridge`, or an nnsight-wrapped model): unwrapped to the HF model inside;
  * a bundled default name (`smollm2-135m`, `minilm-l6`, `gemma3-270m`, see `bundled.py`);
  * a path to a `.gguf` file (dequantised by transformers; a converted copy is cached);
  * a path to a local Hugging Face directory (config.json + weights);
  * anything else is taken as a Hugging Face hub name (needs network access or the HF cache).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import bundled, offload
from .adapters import adapter_for
from .atomic import write_json
from .errors import LensbenchError
from .model import Model, describe
from .saved import is_own_layout, load_own_layout, saved_gguf
from .adapters import registered

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")




def load(source: Any, *, tokenizer: Any = None, dtype: torch.dtype | str | None = None,
         revision: str | None = None, device: str = "cpu", layer_by_layer: bool = False,
         mmap: bool = True, packed: bool = False) -> Model:
    """Load a model from any supported source (see the module docstring) into a `Model`: the Hugging Face
    module, its tokenizer, the adapter that names its parts, and a card with its fingerprint.

        >>> model = lb.load("smollm2-135m")        # bundled; also a folder, a .gguf file or a hub name
        >>> model.n_layers, model.is_causal_lm
        (30, True)

    `layer_by_layer=True` leaves the weights in the model's safetensors files and reads each module's in only
    while it runs (`lensbench.offload`), for models larger than memory; a local folder, a hub name, a GGUF file
    or a bundled name (both through their converted safetensors copy). `mmap=False` reads the weight files
    into memory instead of mapping them: a mapping stays resident until the process ends, even after the weights
    are released, so a model that `lensbench.convert` packs in place should be loaded without it.
    `packed=True` reads a compressed-tensors folder (`lensbench compress --format compressed-tensors`) straight into
    packed modules, never holding its quantised weights as floats (`lensbench.packed_load`).
    """
    if packed:
        return _load_packed(source, dtype=dtype, device=device, layer_by_layer=layer_by_layer)
    if isinstance(source, Model):
        return source
    if isinstance(source, nn.Module) or _is_wrapper(source):
        return from_module(source, tokenizer=tokenizer)
    if not isinstance(source, (str, os.PathLike)):
        raise LensbenchError(f"cannot load a model from a {type(source).__name__}: give a path, a bundled name "
                             f"({', '.join(bundled.NAMES)}), a hub name or a torch module")
    text = str(source)
    if text in bundled.NAMES:
        path, card = bundled.resolve(text)
        model = load(path, dtype=dtype, device=device, layer_by_layer=layer_by_layer, mmap=mmap)
        model.card.update(card)
        return model
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf" or path.exists():
        return _load_local(path, dtype=dtype, device=device, layer_by_layer=layer_by_layer, mmap=mmap)
    if _looks_like_path(text):
        raise LensbenchError(f"model path {text} does not exist: check the path, or use a bundled name "
                             f"({', '.join(bundled.NAMES)})")
    return _load_hub(text, revision=revision, dtype=dtype, device=device, layer_by_layer=layer_by_layer, mmap=mmap)


def _load_packed(source: Any, *, dtype, device, layer_by_layer: bool) -> Model:
    from .packed_load import load_packed  # heavy: gpu's packed modules and their kernels, only for packed loading

    card = {}
    if isinstance(source, str) and source in bundled.NAMES:
        source, card = bundled.resolve(source)
    path = Path(str(source)).expanduser() if isinstance(source, (str, os.PathLike)) else None
    gguf_file = path is not None and path.suffix.lower() == ".gguf" and path.is_file()
    if path is None or not (path.is_dir() or gguf_file):
        raise LensbenchError(f"packed=True loads a compressed-tensors folder that lensbench compress wrote or a "
                             f"GGUF file, not {source if path is not None else type(source).__name__}: give one of "
                             f"those, or load without packed=True and pack the model with lensbench.convert")
    if layer_by_layer:
        raise LensbenchError("a packed model is loaded whole (its packed bytes are the point): drop layer_by_layer "
                             "or packed=True")
    if gguf_file:
        from .gguf_packed import load_gguf_packed  # heavy: gguf and the packed modules, only for packed GGUF files

        converted, gguf_card, _ = _gguf_converted(path)
        model = load_gguf_packed(path, converted, _auto_class, dtype=_dtype(dtype), device=device)
        model.card.update({**gguf_card, **card, "format": "gguf, packed"})
        return model
    return load_packed(path, _auto_class, dtype=_dtype(dtype), device=device)


def _looks_like_path(text: str) -> bool:
    """Hub names are `name` or `org/name`; anything else that does not exist is a mistyped path."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1


def _is_wrapper(obj: Any) -> bool:
    return type(obj).__module__.startswith(("nnsight", "transformer_lens"))


def _unwrap(obj: Any) -> nn.Module:
    """The Hugging Face model inside a TransformerLens bridge or an nnsight wrapper."""
    if type(obj).__module__.startswith("nnsight"):
        obj = object.__getattribute__(obj, "_module")  # the wrapped module, bypassing nnsight's proxies
    inner = getattr(obj, "original_model", None)  # TransformerLens TransformerBridge
    if isinstance(inner, nn.Module):
        obj = inner
    if isinstance(obj, nn.Module) and hasattr(obj, "config"):
        return obj
    raise LensbenchError(f"cannot find a Hugging Face model inside {type(obj).__name__}; pass the HF model itself")


def from_module(obj: Any, tokenizer: Any = None, card: dict | None = None) -> Model:
    module = _unwrap(obj)
    if tokenizer is None:
        tokenizer = getattr(obj, "tokenizer", None)
    if tokenizer is None:
        raise LensbenchError("this model came without a tokenizer: pass tokenizer= to lensbench.load")
    module.eval()
    adapter = adapter_for(module)
    info = {"name": getattr(module.config, "_name_or_path", "") or type(module).__name__, "source": "module",
            **describe(module)}
    info.update(card or {})
    return Model(module, tokenizer, adapter, info)


def _auto_class(config):
    from transformers import AutoModel, AutoModelForCausalLM  # heavy: transformers, imported when a model is loaded

    archs = getattr(config, "architectures", None) or []
    return AutoModelForCausalLM if any(a.endswith(CAUSAL_SUFFIXES) for a in archs) else AutoModel


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise LensbenchError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None


def _load_local(path: Path, *, dtype, device, layer_by_layer: bool = False, mmap: bool = True) -> Model:
    if not path.exists():
        raise LensbenchError(f"model path {path} does not exist: check the path")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LensbenchError(f"{path} is a file but not a .gguf file: give a GGUF file or a model directory")
        return _load_gguf(path, dtype=dtype, device=device, layer_by_layer=layer_by_layer, mmap=mmap)
    if is_own_layout(path):
        if layer_by_layer:
            raise LensbenchError(f"{path} is a folder lensbench compress wrote; layer-by-layer mode reads Hugging "
                                 f"Face folders: load it without --layer-by-layer")
        return load_own_layout(path, dtype=_dtype(dtype), device=device)
    if saved_gguf(path) is not None:  # a folder lensbench compress --format gguf wrote
        return _load_gguf(saved_gguf(path), dtype=dtype, device=device, layer_by_layer=layer_by_layer, mmap=mmap)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
        raise LensbenchError(f"{path} has no config.json, so it is not a Hugging Face model directory{hint}")
    return _load_hf_dir(path, dtype=dtype, device=device, card={"source": str(path.resolve())},
                        layer_by_layer=layer_by_layer, mmap=mmap)


def _load_hf_dir(path: Path, *, dtype, device, card: dict, layer_by_layer: bool = False, mmap: bool = True) -> Model:
    import transformers  # heavy: transformers, imported when a model is loaded
    from transformers import AutoConfig, AutoTokenizer  # heavy: transformers, imported when a model is loaded

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        if "does not recognize this architecture" in str(exc):
            model_type = _model_type(path / "config.json")
            raise LensbenchError(f"{path}: transformers {transformers.__version__} has no model type {model_type!r}; "
                                 f"use a transformers release that has it, or a model of a supported family "
                                 f"(lensbench models lists them)") from None
        raise LensbenchError(f"{path}/config.json cannot be read ({_first_line(exc)}): restore the file") from None
    _check_adapter_for_config(config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if layer_by_layer:
                if device != "cpu":
                    raise LensbenchError(f"layer-by-layer mode runs on the CPU, not {device}: drop the device or "
                                         f"--layer-by-layer")
                module = offload.build(_auto_class(config), config, path, _dtype(dtype))
            else:
                module = _auto_class(config).from_pretrained(path, dtype=_dtype(dtype) or "auto", disable_mmap=not mmap)
    except LensbenchError:
        raise
    except Exception as exc:  # corrupt or missing weight files surface here with many exception types
        raise LensbenchError(f"cannot load the weights in {path}: {_first_line(exc)}; "
                             f"the files may be corrupt or incomplete, re-download or re-convert them") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    module.to(device).eval()
    info = {"name": card.get("name", path.name), **describe(module), **card,
            **({"layer_by_layer": True} if layer_by_layer else {})}
    return Model(module, tokenizer, adapter_for(module), info)


def _model_type(config_path: Path) -> str:
    try:
        return str(json.loads(config_path.read_text()).get("model_type", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


def _check_adapter_for_config(config) -> None:
    """Fail before loading any weights when no adapter could handle the model."""

    archs = getattr(config, "architectures", None) or []
    if archs and not any(a in registered() for a in archs):
        known = sorted({a for a in archs})
        raise LensbenchError(
            f"no lensbench adapter for {', '.join(known)} (model_type {getattr(config, 'model_type', '?')!r}); "
            f"register one with @lensbench.adapters.register({known[0]!r}) (see lensbench/adapters/llama.py)"
        )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# --- GGUF ------------------------------------------------------------------------------------
def _gguf_converted(path: Path) -> tuple[Path, dict, bool]:
    """The converted safetensors copy of a GGUF file, the card entries naming both, and whether the copy was
    made just now (it is made when missing)."""
    sha = _file_sha256(path)
    target = bundled.cache_dir() / "gguf" / sha[:16]
    fresh = not (target / "lensbench-cache.json").is_file()
    if fresh:
        _convert_gguf(path, target, sha)
    return target, {"name": path.stem, "source": str(path.resolve()), "format": "gguf", "sha256": sha,
                    "local_dir": str(target)}, fresh  # the converted copy: a plain HF directory other tools load


def _load_gguf(path: Path, *, dtype, device, layer_by_layer: bool = False, mmap: bool = True) -> Model:
    """Dequantise a GGUF file once, cache a safetensors copy keyed by the file's hash, reuse it."""
    target, card, fresh = _gguf_converted(path)
    try:
        return _load_hf_dir(target, dtype=dtype, device=device, card=card, layer_by_layer=layer_by_layer, mmap=mmap)
    except LensbenchError:  # the cached copy is damaged (a full disk, an edit): convert once more from the GGUF
        if fresh:
            raise
        print(f"lensbench: the converted copy of {path.name} in {target} is damaged; converting it again",
              file=sys.stderr)
        shutil.rmtree(target, ignore_errors=True)
        _convert_gguf(path, target, card["sha256"])
        return _load_hf_dir(target, dtype=dtype, device=device, card=card, layer_by_layer=layer_by_layer, mmap=mmap)


def _convert_gguf(path: Path, target: Path, sha: str) -> None:
    # heavy: transformers, imported when a model is loaded
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_gguf_header(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            _check_adapter_for_config(config)
            gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except LensbenchError:
        raise
    except Exception as exc:
        raise LensbenchError(f"cannot read GGUF file {path}: {_first_line(exc)}; the file may be corrupt or "
                             f"truncated, download it again") from None
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model with the same weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_json(staging / "lensbench-cache.json", {"gguf": str(path.resolve()), "sha256": sha})
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)  # the cache appears whole or not at all


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise LensbenchError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                             f"download it again")


# --- hub -------------------------------------------------------------------------------------
def _load_hub(name: str, *, revision, dtype, device, layer_by_layer: bool = False, mmap: bool = True) -> Model:
    """A Hugging Face hub name: downloads (or reads the HF cache) then loads like a local directory."""
    try:
        from huggingface_hub import snapshot_download  # heavy: the hub client, only for hub names

        local = snapshot_download(name, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"])
    except Exception as exc:
        raise LensbenchError(
            f"cannot fetch {name!r} from the Hugging Face hub ({_first_line(exc)}); without network access use a "
            f"local directory, a .gguf file, or a bundled model ({', '.join(bundled.NAMES)})") from None
    return _load_hf_dir(Path(local), dtype=dtype, device=device, layer_by_layer=layer_by_layer, mmap=mmap,
                        card={"name": name, "source": f"hf://{name}", "revision": revision or "main"})
