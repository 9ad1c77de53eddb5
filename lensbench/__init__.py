"""lensbench: what every layer of a transformer does, which layers matter, and what removing,
skipping or quantising them costs.

    import lensbench as lb

    model = lb.load("HuggingFaceTB/SmolLM2-135M")            # a hub name, a local folder or a .gguf file
    trace = lb.capture(model, ["The cat sat on the mat."])   # residual streams, sublayer outputs
    profile = lb.profile(model, texts, analyses=["redundancy", "ablation"])
    plan = lb.plan(profile, "drop-block", 3, ranking="ablation")
    with lb.apply(model, plan):                               # the plan executed for real, undone after
        model.module.generate(...)
    report = lb.evaluate(model, plan)                         # quality, speed, bytes vs the dense model
    kv = lb.plan(profile, "kv-tuner", 4.0, model=model)       # KV-cache bits per layer (profile kv_sensitivity)
    lb.compress(model, plan, format="gguf", out="smollm2-pruned")   # a checkpoint llama.cpp loads
    lb.Decoder(lb.convert(model, plan)).generate(ids, 64)     # greedy decode, one compiled step (CPU)

`import lensbench` imports the spine only (loading, capture, Profiles); the decision layer
(`lensbench.compress`: plans, policies, kernels, writers) is imported the first time one of its names is used.
"""
from __future__ import annotations

import logging as _logging
from importlib import import_module as _import_module

from .version import __version__

# transformers imports torchao when it is installed (the dev extra has it); torchao then logs, on every
# import, that its CUDA-only extensions do not load on this CPU build, and torch logs enum-registration
# deprecations. Neither says anything about the user's run.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from .errors import LensbenchError  # noqa: E402
from .load import load  # noqa: E402
from .model import Batch, Model  # noqa: E402
from .trace import Trace  # noqa: E402
from .capture import capture  # noqa: E402
from .profiles import LayerScores, Profile  # noqa: E402
from .profiling import profile_model  # noqa: E402

profile = profile_model  # the public name; `profile_model` is kept for scripts written against it

# Names of the decision layer, imported on first use (PEP 562) so that `import lensbench` stays light.
_LAZY = {
    "Plan": "lensbench.compress.plan",
    "Drop": "lensbench.compress.plan",
    "Quant": "lensbench.compress.plan",
    "KV": "lensbench.compress.plan",
    "KVCache": "lensbench.kvcache",
    "KVSpec": "lensbench.kvcache",
    "cache_bytes": "lensbench.kvcache",
    "plan": "lensbench.compress.policies",
    "apply": "lensbench.compress.apply",
    "convert": "lensbench.compress.apply",
    "Decoder": "lensbench.decoding",
    "evaluate": "lensbench.compress.evaluate",
    "EvalConfig": "lensbench.compress.evaluate",
    "compress": "lensbench.compress",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lensbench' has no attribute {name!r}")
    module = _import_module(_LAZY[name])
    value = module if name == "compress" else getattr(module, name)
    globals()[name] = value
    return value


__all__ = ["Batch", "Decoder", "Drop", "EvalConfig", "KV", "KVCache", "KVSpec", "LayerScores", "LensbenchError",
           "Model", "Plan", "Profile", "Quant", "Trace", "apply", "cache_bytes", "capture", "compress", "convert",
           "evaluate", "load", "plan", "profile", "profile_model", "__version__"]
