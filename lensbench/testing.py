"""Tiny random models for architecture coverage, and contract checks, for tests and plugin authors.

Models are built from transformers config classes (no download); the tokenizer is a small
byte-level BPE trained on the fly, so every family runs offline in milliseconds.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from .load import from_module

SAMPLE_TEXTS = [
    "The city council approved the new budget on Tuesday after a long debate.",
    "Shares in the company rose sharply when it reported record profits.",
    "The band released their third album to warm reviews from critics.",
    "Scientists said the new chip could make phones twice as fast.",
    "The striker scored twice as the home side won the cup final.",
    "Ministers will publish the report next week, officials said.",
]

_D, _H, _KV, _L, _FF, _CTX, _VOCAB = 32, 4, 2, 3, 64, 128, 600
# Extra tokenizer training text so that list items are single tokens (the Laundry List task needs them).
_ITEM_TEXT = "We bought milk, eggs, bread, tea, rice, salt, soap, socks, cake and juice. " * 8


def _configs(n_layers: int = _L):
    import transformers as T  # heavy: transformers, imported when a model is loaded

    common = dict(vocab_size=_VOCAB, max_position_embeddings=_CTX, hidden_size=_D, num_attention_heads=_H,
                  num_hidden_layers=n_layers, intermediate_size=_FF)
    gqa = dict(common, num_key_value_heads=_KV, head_dim=_D // _H)
    return {
        "gpt2": lambda: T.GPT2Config(vocab_size=_VOCAB, n_positions=_CTX, n_embd=_D, n_head=_H, n_layer=n_layers),
        "llama": lambda: T.LlamaConfig(**gqa),
        "qwen2": lambda: T.Qwen2Config(**gqa),
        "mistral": lambda: T.MistralConfig(**gqa),
        "gemma": lambda: T.GemmaConfig(**gqa),
        "gemma2": lambda: T.Gemma2Config(**gqa),
        "phi": lambda: T.PhiConfig(**common),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),
        "gpt_neox_sequential": lambda: T.GPTNeoXConfig(**common, use_parallel_residual=False),
        "bert": lambda: T.BertConfig(**common),
    }


TINY_ARCHS = ("gpt2", "llama", "qwen2", "mistral", "gemma", "gemma2", "phi", "gpt_neox", "gpt_neox_sequential",
              "bert")


@functools.lru_cache(maxsize=2)
def tiny_tokenizer(encoder: bool = False):
    """A 600-token byte-level BPE; causal ones add a BOS token, encoders add [CLS] ... [SEP]."""
    # heavy: transformers' tokenizers, imported when a tiny model is built
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast  # heavy: transformers, imported when a model is loaded

    specials = ["<pad>", "<bos>", "<eos>", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SAMPLE_TEXTS * 4 + [_ITEM_TEXT], trainer)
    if encoder:
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
            ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
        extra = dict(cls_token="[CLS]", sep_token="[SEP]")
    else:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[
            ("<bos>", tok.token_to_id("<bos>"))])
        extra = dict(bos_token="<bos>", eos_token="<eos>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", **extra)


def tiny_hf_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, attn: str = "eager",
                  n_layers: int = _L):
    import transformers as T  # heavy: transformers, imported when a model is loaded

    config = _configs(n_layers)[arch]()
    config._attn_implementation = attn
    torch.manual_seed(seed)
    cls = T.AutoModel if arch == "bert" else T.AutoModelForCausalLM
    module = cls.from_config(config, attn_implementation=attn).to(dtype).eval()
    return module


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, attn: str = "eager",
               n_layers: int = _L):
    """A lensbench Model of family `arch` (see TINY_ARCHS) with random weights and `n_layers` layers."""

    module = tiny_hf_model(arch, seed, dtype, attn, n_layers)
    return from_module(module, tokenizer=tiny_tokenizer(encoder=arch == "bert"), card={"name": f"tiny-{arch}"})


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@contextlib.contextmanager
def no_hooks_left(module: torch.nn.Module) -> Iterator[None]:
    """Fails if the block leaves hooks behind on `module`, whether or not it raised."""
    before = hook_count(module)
    try:
        yield
    finally:
        after = hook_count(module)
        if after != before:
            raise AssertionError(f"{after - before} hook(s) left on the model")


ENCODER_DECODERS = ("t5", "bart")


def more_tiny_hf_models() -> dict:
    """Builders of tiny random HF models of families without a lensbench adapter (for graph-level tools
    such as DynamicLRP that need no adapter): encoder-decoders and more decoders/encoders."""
    import transformers as T  # heavy: transformers, imported when a model is loaded

    return {
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=_VOCAB, d_model=32, d_kv=8, d_ff=64,
                                                              num_layers=2, num_heads=4, decoder_start_token_id=0)),
        "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=_VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=_CTX)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=_VOCAB, hidden_size=32, num_attention_heads=4,
                                                    num_hidden_layers=2, ffn_dim=64, word_embed_proj_dim=32)),
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=_VOCAB, hidden_size=32,
                                                             num_attention_heads=4, num_hidden_layers=2)),
        "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=_VOCAB, hidden_size=32, n_head=4, n_layer=2)),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=_VOCAB, dim=32, n_heads=4, n_layers=2,
                                                                   hidden_dim=64)),
    }


@dataclass
class LoggedWork:
    """A sweep for the executor tests: item i is the summed logits of text i % len(texts) with the model's
    output scaled by (1 + i); each run leaves a file `log/<pid>-<item>-<n>` (who ran what, how often), sleeps
    `pause` seconds so a test can kill a worker mid-sweep, and item `fail_on` raises."""

    log: str
    texts: tuple[str, ...] = tuple(SAMPLE_TEXTS)
    pause: float = 0.0
    fail_on: int | None = None

    def setup(self, model) -> None:
        self.model_ = model

    def run(self, item: int) -> dict:
        if item == self.fail_on:
            raise ValueError(f"item {item} was told to fail")
        log = Path(self.log)
        log.mkdir(parents=True, exist_ok=True)
        (log / f"{os.getpid()}-{item}-{time.monotonic_ns()}").touch()
        time.sleep(self.pause)
        with torch.no_grad():
            batch = self.model_.tokenize([self.texts[item % len(self.texts)]])
            logits = self.model_.module(**batch.model_inputs()).logits
        return {"item": item, "value": float(logits.double().sum()) * (1 + item)}
