"""KV-cache sensitivity (KVTuner, arXiv 2502.04420): how much quantising one layer's keys and values moves
the output, for each (K bits, V bits) pair.

For every calibration text the first half (or `context` tokens) is the prompt, prefilled densely once; the
rest is the continuation. For every layer and every pair of `pairs` (KVTuner's KV8, K8V4, K4V8, KV4, K8V2,
K4V2, K2V4, KV2), only that layer's prompt cache is packed at those bits (`lensbench.kvcache`) and the
continuation runs against it (`lensbench.kvmeasure`). Scores, higher = more sensitive:

* `kv_kl` [layer, pair]: KL(dense || quantised) per continuation token, nats;
* `kv_attn_error` [layer, pair]: that layer's attention output error on the continuation,
  ||a_q - a||^2 / ||a||^2;

and the table `kv_keys_vs_values`: for each pair of equal-bit pairs with the bits swapped (K8V4/K4V8,
K4V2/K2V4, K8V2/K2V8 where measured), the mean KL of each and the share of layers where the key-heavier
one is better — KVTuner's "keys matter more than values" check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..analyzer import Analyzer, register
from ..errors import LensbenchError
from ..kvcache import AXES, PAIRS, KVSpec, pair_name
from ..kvmeasure import continuation_scores, prefill
from ..model import Model
from ..profiles import LayerScores, Table


@register
@dataclass
class KVSensitivity(Analyzer):
    name: ClassVar[str] = "kv_sensitivity"
    layer_by_layer: ClassVar[bool] = True
    sites: ClassVar[tuple[str, ...]] = ("hook_resid_post",)  # the batches' tokens are what it reads
    needs_lm_head: ClassVar[bool] = True

    pairs: tuple[tuple[int, int], ...] = PAIRS
    axis: str = "token"
    group: int = 32
    window: int = 0
    context: int = 0  # prompt tokens of each text (0: half of it)

    def start(self, model: Model) -> None:
        if not model.is_causal_lm:
            raise LensbenchError(f"kv_sensitivity measures the KV cache, which {model.name} (an encoder) does not "
                                 f"have: leave it out of --analyses")
        if self.axis not in AXES:
            raise LensbenchError(f"kv_sensitivity axis {self.axis!r} is not known: use one of {', '.join(AXES)}")
        self.specs_ = [KVSpec(int(k), int(v), self.axis, self.group, self.window) for k, v in self.pairs]
        self.model_ = model
        L, P = model.n_layers, len(self.pairs)
        self.kl_ = np.zeros((L, P))
        self.attn_ = np.zeros((L, P))
        self.n_ = 0
        self.texts_ = 0

    def update(self, trace) -> None:
        for ids, mask in zip(trace.input_ids, trace.attention_mask, strict=False):
            row = ids[mask.bool()][None]
            context = self.context or row.shape[1] // 2
            if not 0 < context < row.shape[1] - 1:
                continue  # too short to continue after its prompt
            pre = prefill(self.model_, row, context)
            for layer in range(self.model_.n_layers):
                for p, spec in enumerate(self.specs_):
                    s = continuation_scores(self.model_, pre, {layer: spec}, attn_layer=layer)
                    self.kl_[layer, p] += s["kl"]
                    self.attn_[layer, p] += s["attn_error"]
            self.n_ += s["n"]
            self.texts_ += 1

    def finish(self) -> list:
        if not self.texts_:
            raise LensbenchError("kv_sensitivity had no text long enough to continue after a prompt: give longer "
                                 "texts or a larger --seq-len")
        names = [pair_name(k, v) for k, v in self.pairs]
        params = self.params() | {"pairs": [list(p) for p in self.pairs], "pair_names": names, "texts": self.texts_}
        kl, attn = self.kl_ / self.n_, self.attn_ / self.texts_
        return [LayerScores("kv_kl", kl, True, ("layer", "pair"), self.name,
                            f"KL(dense || this layer's KV cache at each pair), nats per continuation token; pairs: "
                            f"{', '.join(names)}", params),
                LayerScores("kv_attn_error", attn, True, ("layer", "pair"), self.name,
                            f"relative squared error of this layer's attention output with its KV cache at each "
                            f"pair; pairs: {', '.join(names)}", params),
                Table("kv_keys_vs_values", keys_vs_values(kl, list(self.pairs)), analysis=self.name,
                      description="equal-bit pairs with K and V bits swapped: mean KL of each and the share of "
                                  "layers where more key bits is better (KVTuner: keys matter more)", params=params)]


def keys_vs_values(kl: np.ndarray, pairs: list[tuple[int, int]]) -> list[dict]:
    """One row per measured (Kh, Vl) / (Kl, Vh) couple with h > l."""
    rows = []
    for a, (k, v) in enumerate(pairs):
        if k > v and (v, k) in pairs:
            b = pairs.index((v, k))
            rows.append({"key_heavy": pair_name(k, v), "value_heavy": pair_name(v, k),
                         "key_heavy_kl": float(kl[:, a].mean()), "value_heavy_kl": float(kl[:, b].mean()),
                         "layers_key_heavy_better": float((kl[:, a] < kl[:, b]).mean())})
    return rows
