"""The header (architecture metadata, tokenizer) and tensor list of a GGUF file written by lensbench.

From a source GGUF file every key is copied (`block_count` lowered, per-layer arrays shortened, the
mixed-type file leaving out `general.file_type`) and its tensors are listed with their types. From a
Hugging Face model the header is built from the config and the tokenizer, as llama.cpp's own converter
lays it out, for the families below (llama.cpp architecture in brackets); others are refused by name.

    llama, mistral [llama; q/k rows permuted to llama.cpp's rotary order], qwen2 [qwen2], qwen3 [qwen3]

Tokenizers: byte-level BPE (tokenizer.json with merges) as llama.cpp's `gpt2` tokenizer model with the
`default` pre-tokenizer; special added tokens are control tokens. The token list is padded to the
embedding's rows as llama.cpp's converter does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import LensbenchError
from ...saved import tied_head_key
import gguf
from gguf import GGUFValueType as T
from gguf import TokenType

FAMILIES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
            "qwen3": ("qwen3", False)}  # model_type: (llama.cpp architecture, q/k permuted)
PERMUTED_ARCHS = {"llama"}


@dataclass
class GGUFHeader:
    arch: str
    permute: bool
    tensors: list[tuple[str, str, str | None]]  # (GGUF name, Hugging Face name, source GGML type or None)
    copy_from: object = None  # a GGUFReader whose fields are copied
    hf: dict = field(default_factory=dict)  # the header built from a Hugging Face model

    # --- from a GGUF file ------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: Path, model) -> "GGUFHeader":

        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        n = int(reader.fields[f"{arch}.block_count"].contents())
        to_hf = _hf_names(model, arch, n)
        tensors = []
        for t in reader.tensors:
            if t.name not in to_hf:
                raise LensbenchError(f"{path.name} holds {t.name}, which has no weight in the loaded model; GGUF "
                                     f"output for architecture {arch!r} is not supported yet")
            tensors.append((t.name, to_hf[t.name], t.tensor_type.name))
        return cls(arch, arch in PERMUTED_ARCHS, tensors, copy_from=reader)

    # --- from a Hugging Face model ---------------------------------------------------------------
    @classmethod
    def from_hf(cls, model) -> "GGUFHeader":
        cfg = model.module.config
        kind = getattr(cfg, "model_type", None)
        if kind not in FAMILIES:
            raise LensbenchError(f"GGUF output from a Hugging Face {kind!r} model is not written yet (supported: "
                                 f"{', '.join(FAMILIES)}); convert it with llama.cpp's convert_hf_to_gguf.py and "
                                 f"compress the .gguf file")
        arch, permute = FAMILIES[kind]
        to_hf = _hf_names(model, arch, cfg.num_hidden_layers)
        head = _tied_head(model)
        known = set(to_hf.values())
        missing = [n for n in model.module.state_dict() if n not in known and n != head]
        if missing:
            raise LensbenchError(f"{missing[0]} has no GGUF tensor name for architecture {arch!r}; GGUF output of "
                                 f"this model is not supported")
        order = list(model.module.state_dict())
        tensors = sorted(((gg, hf, None) for gg, hf in to_hf.items() if hf != head), key=lambda t: order.index(t[1]))
        return cls(arch, permute, tensors, hf=_hf_fields(model, arch))

    # --- writing ---------------------------------------------------------------------------------
    def write_fields(self, writer, kept: list[int]) -> None:

        arch = self.arch
        if self.copy_from is None:
            for key, (val, vtype, sub) in self.hf.items():
                writer.add_key_value(key, len(kept) if key == f"{arch}.block_count" else val, vtype, sub_type=sub)
            return
        n = int(self.copy_from.fields[f"{arch}.block_count"].contents())
        for key, f in self.copy_from.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue
            val, vtype = f.contents(), f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            if key == f"{arch}.block_count":
                val = len(kept)
            elif sub is not None and key.startswith(arch + ".") and len(val) == n:
                val = [val[i] for i in kept]
            writer.add_key_value(key, val, vtype, sub_type=sub)


def _hf_names(model, arch: str, n_blocks: int) -> dict[str, str]:
    """{GGUF tensor name: Hugging Face parameter name} for the model's weights."""

    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise LensbenchError(f"the gguf package has no tensor names for architecture {arch!r}")
    tmap = gguf.get_tensor_name_map(archs[arch], n_blocks)
    out = {}
    for name in model.module.state_dict():
        base, _, suffix = name.rpartition(".")
        gg = tmap.get_name(base)
        if gg is not None:
            out[f"{gg}.{suffix}"] = name
    return out


def _tied_head(model) -> str | None:
    return tied_head_key(model.module)


def _hf_fields(model, arch: str) -> dict[str, tuple]:
    """{key: (value, GGUF value type, array subtype)} of the header llama.cpp's converter writes."""

    cfg = model.module.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    f: dict[str, tuple] = {
        "general.name": (model.name, T.STRING, None),
        f"{arch}.block_count": (cfg.num_hidden_layers, T.UINT32, None),
        f"{arch}.context_length": (cfg.max_position_embeddings, T.UINT32, None),
        f"{arch}.embedding_length": (cfg.hidden_size, T.UINT32, None),
        f"{arch}.feed_forward_length": (cfg.intermediate_size, T.UINT32, None),
        f"{arch}.attention.head_count": (heads, T.UINT32, None),
        f"{arch}.attention.head_count_kv": (getattr(cfg, "num_key_value_heads", heads), T.UINT32, None),
        f"{arch}.rope.freq_base": (float(rope), T.FLOAT32, None),
        f"{arch}.attention.layer_norm_rms_epsilon": (float(cfg.rms_norm_eps), T.FLOAT32, None),
        f"{arch}.rope.dimension_count": (head_dim, T.UINT32, None),
        f"{arch}.vocab_size": (cfg.vocab_size, T.UINT32, None),
    }
    if getattr(cfg, "head_dim", None):  # as llama.cpp's converter: readers take the head size from these
        f[f"{arch}.attention.key_length"] = (head_dim, T.UINT32, None)
        f[f"{arch}.attention.value_length"] = (head_dim, T.UINT32, None)
    f.update(_tokenizer_fields(model.tokenizer, cfg.vocab_size))
    return f


def _tokenizer_fields(tok, n_rows: int) -> dict[str, tuple]:

    backend = getattr(tok, "backend_tokenizer", None)
    doc = json.loads(backend.to_str()) if backend is not None else {}
    model = doc.get("model", {})
    if model.get("type") != "BPE" or "merges" not in model:
        raise LensbenchError("GGUF output from a Hugging Face model needs a byte-level BPE tokenizer "
                             "(tokenizer.json with merges); convert this one with llama.cpp's convert_hf_to_gguf.py")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_rows:
        raise LensbenchError(f"the tokenizer has ids up to {max(vocab.values())} but the embedding only {n_rows} rows")
    special = {a["id"] for a in doc.get("added_tokens", []) if a.get("special")}
    added = {a["id"] for a in doc.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(n_rows)]
    types = [int(TokenType.UNUSED)] * n_rows
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added
                       else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    f = {"tokenizer.ggml.model": ("gpt2", T.STRING, None), "tokenizer.ggml.pre": ("default", T.STRING, None),
         "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
         "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
         "tokenizer.ggml.merges": (merges, T.ARRAY, T.STRING)}
    for key, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unknown", tok.unk_token_id),
                       ("padding", tok.pad_token_id)):
        if value is not None:
            f[f"tokenizer.ggml.{key}_token_id"] = (int(value), T.UINT32, None)
    return f
