"""llm-compressor's GPTQ as a peer row of benchmarks/quant_peers.py, in its own venv and process.

llm-compressor pins a transformers and compressed-tensors other than lensbench's lock, so it runs from a separate
venv (requirements/llmc.in) and never imports lensbench. The parent writes a job (JSON): a Hugging Face model
folder of the same weights, the calibration token ids, the held-out batches exactly as lensbench scores them
(input ids, attention mask, scored positions, next tokens) and the grid. This process keeps a dense copy of the model,
quantises every block linear with `oneshot` + `GPTQModifier` (the LM head is left as it is, as in lensbench's
rows), runs both models on the same held-out batches and writes KL to dense, perplexity and
the quantisation seconds (JSON). The dense perplexity it reports must equal the parent's: the two processes
score the same tokens.

Usage: python benchmarks/llmc_worker.py JOB.json RESULT.json   (with the llm-compressor venv's python)
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from importlib import metadata

import torch


def logprobs(model, batch) -> torch.Tensor:
    out = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                use_cache=False).logits
    return torch.log_softmax(out[torch.tensor(batch["content_mask"])].double(), -1)


def main(job_path: str, result_path: str) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    job = json.loads(open(job_path).read())
    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    model.eval()
    # the dense model is kept (a copy of the weights) and scored beside the quantised one batch by batch: the dense
    # log-probabilities of every held-out batch at once would be tokens x vocabulary float64 values (8.6 GB for
    # Gemma-3's 262k vocabulary on 32 texts; its first run was killed for memory)
    dense = copy.deepcopy(model)
    calib = Dataset.from_dict({"input_ids": job["calibration"],
                               "attention_mask": [[1] * len(ids) for ids in job["calibration"]]})
    weights = {"num_bits": job["bits"], "type": "int", "symmetric": job["symmetric"], "strategy": "group",
               "group_size": job["group_size"]}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head"], actorder=job["actorder"], dampening_frac=job["damp"],
                          block_size=job["block"], **({"weight_observer": job["observer"]} if job["observer"] else {}))
    t0 = time.time()
    model = oneshot(model=model, dataset=calib, recipe=recipe, num_calibration_samples=len(job["calibration"]),
                    max_seq_length=job["seq_len"], shuffle_calibration_samples=False)
    seconds = time.time() - t0
    kl = nll = dense_nll = 0.0
    n_kl = n_next = 0
    with torch.no_grad():
        for batch in job["heldout"]:
            logp, logq = logprobs(dense, batch), logprobs(model, batch)
            tgt = torch.tensor(batch["next_tokens"])
            has = tgt >= 0
            pick = tgt.clamp(min=0)[:, None]
            kl += float((logp.exp() * (logp - logq)).sum())
            nll -= float(logq.gather(1, pick)[:, 0][has].sum())
            dense_nll -= float(logp.gather(1, pick)[:, 0][has].sum())
            n_kl, n_next = n_kl + logq.shape[0], n_next + int(has.sum())
    result = {"kl_to_dense": kl / n_kl, "perplexity": math.exp(nll / n_next),
              "dense_perplexity": math.exp(dense_nll / n_next), "seconds": seconds,
              "versions": {p: metadata.version(p) for p in ("llmcompressor", "compressed-tensors", "transformers",
                                                             "torch")}}
    open(result_path, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
