"""Short human-readable summaries of a Profile (what the CLI prints)."""
from __future__ import annotations

import numpy as np

from .profiles import Profile


def _fmt(layers: list[int], values) -> str:
    return ", ".join(f"{i} ({values[i]:.3f})" for i in layers)


def redundancy_summary(profile: Profile, k: int = 3) -> str:
    """The most and least redundant blocks and sublayers by input/output cosine."""
    m, d = profile.model, profile.data
    if "block_cosine" not in profile.scores:
        return f"{m.get('name')} ({m.get('class')}, {m.get('n_layers')} layers): no redundancy scores"
    lines = [f"{m.get('name')} ({m.get('class')}, {m.get('n_layers')} layers, d_model {m.get('d_model')}) "
             f"on {d.get('n_texts')} texts / {d.get('n_tokens')} tokens"]
    for key, label in (("block_cosine", "blocks"), ("attn_cosine", "attention"), ("mlp_cosine", "MLPs")):
        if key not in profile.scores:
            continue
        s = profile[key]
        order = s.ranking()  # most important (lowest cosine) first
        lines.append(f"  {label:9s} most redundant (cos in→out): {_fmt(order[::-1][:k], s.values)}")
        lines.append(f"  {label:9s} least redundant:             {_fmt(order[:k], s.values)}")
    if "logit_lens_kl_nats" in profile.scores:
        kl = profile["logit_lens_kl_nats"].values
        lines.append(f"  logit lens KL to the output (nats): layer 0 {kl[0]:.2f}, layer {len(kl) // 2} "
                     f"{kl[len(kl) // 2]:.2f}, layer {len(kl) - 1} {kl[-1]:.2f}")
    return "\n".join(lines)


def channels_summary(profile: Profile, k: int = 8) -> str:
    """The strongest SVD channels (writer head component -> reader head)."""
    table = profile.tables.get("channels")
    if table is None:
        return "no channel graph in this profile"
    lines = [f"channels: {table.params.get('n_edges_found', len(table.rows))} writer components above the null "
             f"(z > {table.params.get('z')}); strongest:"]
    for e in table.rows[:k]:
        (lw, hw), (lr, hr) = e["writer"], e["reader"]
        lines.append(f"  head {lw}.{hw} component {e['component']} -> head {lr}.{hr} ({e['mode']}-composition, "
                     f"score {e['score']:.3f}, z {e['z']:.1f})")
    return "\n".join(lines)


def interventions_summary(profile: Profile) -> str:
    """Each intervention's effect next to its random-component control."""
    table = profile.tables.get("interventions")
    if table is None:
        return "no interventions in this profile"
    lines = ["interventions (project the component out; control: mean of random components of the same head):"]
    for r in table.rows:
        (lw, hw), (lr, hr) = r["writer"], r["reader"]
        ratio = r["reader_attention_tv"] / max(r["random_reader_attention_tv_mean"], 1e-12)
        lines.append(f"  {lw}.{hw} c{r['component']} -> {lr}.{hr}: reader attention TV {r['reader_attention_tv']:.4f} "
                     f"vs {r['random_reader_attention_tv_mean']:.4f} ({ratio:.1f}x); output KL "
                     f"{r['kl_nats']:.2e} vs {r['random_kl_nats_mean']:.2e} nats; target log-prob change "
                     f"{r['target_logprob_change']:+.2e} vs {r['random_target_logprob_change_mean']:+.2e}")
    return "\n".join(lines)


def sensitivity_summary(profile: Profile, k: int = 3) -> str:
    """Least and most important units by ablation, skip effect and geometry, and how rankings agree."""
    lines = []
    for key, label in (("ablation_kl_block", "blocks (KL without it)"), ("ablation_kl_attn", "attention"),
                       ("ablation_kl_mlp", "MLPs"), ("skip_output_effect", "skip effect on output"),
                       ("geometry_error", "tokenwise-fit error")):
        if key in profile.scores:
            s = profile[key]
            order = s.ranking()
            lines.append(f"  {label:22s} least important: {_fmt(order[::-1][:k], s.values)}; most: "
                         f"{_fmt(order[:k], s.values)}")
    if "kv_kl" in profile.scores:
        kv = profile["kv_kl"]
        names = kv.params["pair_names"]
        col = names.index("KV4") if "KV4" in names else len(names) // 2
        order = [int(i) for i in np.argsort(-kv.values[:, col], kind="stable")]
        label, v = "KV cache at " + names[col], kv.values[:, col]
        lines.append(f"  {label:22s} least sensitive: {_fmt(order[::-1][:k], v)}; most: {_fmt(order[:k], v)}")
        table = profile.tables.get("kv_keys_vs_values")
        for row in table.rows if table else []:
            lines.append(f"  {row['key_heavy']} vs {row['value_heavy']}: KL {row['key_heavy_kl']:.4f} vs "
                         f"{row['value_heavy_kl']:.4f}, more key bits better in {row['layers_key_heavy_better']:.0%} "
                         f"of layers")
    if "geometry_summary" in profile.tables:
        rho = profile.tables["geometry_summary"].rows[0]["spearman_error_vs_replacement_kl"]
        lines.append(f"  geometry: Spearman(tokenwise error, output change when replaced) = {rho:.2f}")
    if "ranking_agreement" in profile.scores:
        a = profile["ranking_agreement"]
        names = a.params["rankings"]
        pick = [n for n in ("block_cosine", "ablation_kl_block", "skip_output_effect", "geometry_error") if n in names]
        pick += [n for n in names if n.startswith("quant_kl_block_int")][:1]
        pairs = [(x, y) for i, x in enumerate(pick) for y in pick[i + 1:]]
        if pairs:
            lines.append("  ranking agreement (Spearman): " + ", ".join(
                f"{x} ~ {y} {a.values[names.index(x), names.index(y)]:+.2f}" for x, y in pairs))
    return "\n".join(["sensitivity:", *lines]) if lines else ""


def evaluation_summary(r: dict) -> str:
    """One line of a `lensbench evaluate` record: quality, speed (causal LMs) and weights against dense."""
    parts = [f"after {r['context']}-token prompts:" if "context" in r else "",
             f"KL {r['kl_to_dense']:.4f} nats/token",
             f"perplexity {r['perplexity']:.1f} (dense {r['dense_perplexity']:.1f})"]
    if "city_accuracy" in r:
        parts.append(f"city facts {r['city_accuracy']:.3f} (dense {r['dense_city_accuracy']:.3f})")
    if "topic_accuracy" in r:
        parts.append(f"topics {r['topic_accuracy']:.2f} (dense {r['dense_topic_accuracy']:.2f}, chance "
                     f"{r['topic_chance']:.2f})")
    if "decode_speed_ratio" in r:
        parts.append(f"prefill x{r['prefill_speed_ratio']:.2f}, decode x{r['decode_speed_ratio']:.2f} vs dense")
    parts.append(f"weights {r['weight_bytes'] / 2**20:.0f} MiB ({r['weight_bytes'] / r['dense_weight_bytes']:.2f} "
                 f"of dense)")
    if "kv_cache_bytes" in r:
        kv = r["kv_cache_bytes"]
        parts.append(f"KV cache {kv / 2**20:.1f} MiB ({kv / r['dense_kv_cache_bytes']:.2f} of dense)")
    return ", ".join(p for p in parts if p).replace(":,", ":")
