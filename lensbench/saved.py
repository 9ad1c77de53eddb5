"""Reading back the folders `lensbench compress` writes (the writers are in `lensbench.compress`).

A saved folder holds `lensbench-compress.json` (the record: plan, source, format, per-tensor types). A
GGUF folder is read through its file; a plan that removes an attention or MLP alone is saved in
lensbench's own layout (`lensbench-config.json` and `lensbench-model.json` instead of `config.json`),
rebuilt here from its config with the removed sublayers taken out.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .adapters import adapter_for
from .errors import LensbenchError
from .model import Model, describe
from .surgery import remove_for_good
from .units import Unit

RECORD = "lensbench-compress.json"
OWN_CONFIG = "lensbench-config.json"
OWN_MANIFEST = "lensbench-model.json"


def read_record(path: Path) -> dict | None:
    """The `lensbench-compress.json` of a folder `compress` wrote, or None when there is none or it is unreadable."""
    try:
        record = json.loads((Path(path) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def tied_head_key(module: torch.nn.Module) -> str | None:
    """The LM head's weight name when it is tied to the embedding (the loader re-ties it), else None."""
    head = module.get_output_embeddings()
    if head is None or not getattr(module.config, "tie_word_embeddings", False):
        return None
    return next((n + ".weight" for n, m in module.named_modules() if m is head), None)


def saved_gguf(path: Path) -> Path | None:
    """The .gguf file in a folder that `lensbench compress --format gguf` wrote, else None."""
    record = read_record(path) or {}
    file = path / str(record.get("file", "")) if record.get("format") == "gguf" else None
    return file if file is not None and file.is_file() else None


def is_own_layout(path: Path) -> bool:
    return (path / OWN_MANIFEST).is_file() and (path / OWN_CONFIG).is_file()


def load_own_layout(path: Path, *, dtype=None, device: str = "cpu"):
    """Rebuild a model saved in lensbench's own layout: the architecture from its config, the removed
    sublayers taken out, then the saved weights loaded strictly."""
    import transformers  # heavy: imported when a model is loaded, not with lensbench
    from transformers import AutoConfig, AutoTokenizer


    try:
        doc = json.loads((path / OWN_MANIFEST).read_text(encoding="utf-8"))
        units = [Unit(int(r["layer"]), str(r["kind"])) for r in doc["removed"]]
        cfg = json.loads((path / OWN_CONFIG).read_text(encoding="utf-8"))
        config = AutoConfig.for_model(**cfg)
        cls = getattr(transformers, doc["class"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LensbenchError(f"{path} is not a readable lensbench checkpoint ({exc}); save it again with "
                             f"lensbench compress") from None
    module = cls(config)
    model = Model(module, AutoTokenizer.from_pretrained(path), adapter_for(module),
                  {"name": path.name, "source": str(path.resolve()), "format": "lensbench"})
    remove_for_good(model, units)
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = module.load_state_dict(weights, strict=False)
    allowed = {tied_head_key(module)} - {None}
    if unexpected or set(missing) - allowed:
        raise LensbenchError(f"{path}/model.safetensors does not match its config (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}); save it again with lensbench compress")
    if allowed:
        module.tie_weights()
    module.to(device=device, dtype=dtype).eval() if dtype else module.to(device).eval()
    model.card.update(describe(module))
    return model
