"""`lb.load(file.gguf, packed=True)`: a GGUF file's 32-value quantised weights read straight into packed modules,
holding the file's own values (byte-exact codes and scales), everything else read dense."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lensbench as lb
from lensbench.compress import compress
from lensbench.compress.plan import Plan, Quant
from lensbench.errors import LensbenchError
from lensbench.gpu import cpu_kernels, ggml
from lensbench.gpu.modules import QuantEmbedding, QuantLinear
from lensbench.gguf_packed import _unpermuted_rows
from lensbench.gguf_table import read_table
from lensbench.profiling import model_card


@pytest.mark.parametrize("qtype", sorted(ggml.READABLE))
def test_read_gives_the_codes_and_grid_of_gguf_s_own_values(qtype):
    w = np.random.default_rng(1).standard_normal((24, 160)).astype(np.float32) * 0.05
    data = ggml.quantize(w, qtype)
    codes, scale, low, bits = ggml.read(data, qtype, w.shape)
    assert codes.max() < 2 ** bits and scale.shape == low.shape == (24, 5)
    values = (codes.reshape(24, 5, 32) * scale[..., None] + low[..., None]).reshape(w.shape)
    assert np.array_equal(values, ggml.dequantize(data, qtype).reshape(w.shape))  # bit for bit
    assert np.array_equal(scale.astype(np.float16).astype(np.float32), scale)  # the packed format's float16 holds it
    with pytest.raises(ggml.GGMLError, match="Q4_K is not one of the types read as codes"):
        ggml.read(data, "Q4_K", w.shape)


def test_unpermuting_undoes_llama_cpp_s_rotary_row_order():
    heads, size = 3, 8  # llama.cpp's converter: rows (h, half, i) stored at (h, i, half)
    w = np.arange(heads * size * 5).reshape(heads * size, 5)
    stored = w.reshape(heads, 2, size // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(stored[_unpermuted_rows(heads * size, heads)], w)


def test_the_tensor_table_is_what_gguf_s_reader_reads(tiny, tmp_path):
    import gguf

    model = tiny("llama")
    plan = Plan.drop(model_card(model), [])
    plan.actions["model.layers.0"] = Quant(4, scheme="gguf")
    saved = compress(model, plan, format="gguf", out=tmp_path / "ck")
    file = saved.path / saved.record["file"]
    table, reader = read_table(file), gguf.GGUFReader(file)
    assert table.architecture == "llama" and set(table.tensors) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        info = table.tensors[t.name]
        assert (info.shape, info.type, info.offset) == (tuple(int(d) for d in t.shape), t.tensor_type.name,
                                                          t.data_offset)
        assert np.array_equal(table.data(info), np.asarray(t.data).view(np.uint8).reshape(-1)), t.name
    data = file.read_bytes()
    last = max(table.tensors.values(), key=lambda i: i.offset)
    for cut in (200, last.offset + 3):  # inside the metadata, inside the last tensor
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(LensbenchError, match="is truncated or corrupt"):
            read_table(short)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_file_loads_packed_and_computes_its_dense_values(tiny, tmp_path, arch):
    model = tiny(arch)
    plan = Plan.drop(model_card(model), [])  # layer 2 stays float
    plan.actions["model.layers.0"] = Quant(4, scheme="gguf")  # 32 inputs: Q4_K falls back to Q4_0
    plan.actions["model.layers.1"] = Quant(8, scheme="gguf")  # Q8_0
    saved = compress(model, plan, format="gguf", out=tmp_path / "ck")
    file = saved.path / saved.record["file"]
    packed = lb.load(file, packed=True)
    quant = {n: m for n, m in packed.module.named_modules() if isinstance(m, QuantLinear)}
    assert {".".join(n.split(".")[:3]) for n in quant} == {"model.layers.0", "model.layers.1"}
    assert len(quant) == 14 and {m.bits for m in quant.values()} == {4, 8}
    assert all(m.group_size == 32 for m in quant.values())
    assert packed.card["format"] == "gguf, packed" and packed.card["packed_weights"] == 14
    assert packed.card["dense_weights"] == {"F32": 9}  # layer 2's linears and the tables, stored as floats
    assert not any(p.is_meta for p in packed.module.parameters())
    dense = lb.load(file)
    for name, m in quant.items():  # the file's own values, exactly
        assert torch.equal(m.weight, dense.module.get_submodule(name).weight.float()), name
    ids = torch.randint(5, 490, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), cpu_kernels.exact_kernels():
        got, want = packed.module(ids).logits, dense.module(ids).logits
    assert (got - want).abs().max() <= 1e-4
    assert packed.module.generate(ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_the_bundled_smollm2_loads_packed_at_its_own_grid(smollm):
    packed = lb.load("smollm2-135m", packed=True)
    root = packed.module
    assert packed.card["packed_weights"] == 212 and packed.card["dense_weights"] == {}  # 210 linears, table, head
    assert not [n for n, m in root.named_modules() if type(m) is nn.Linear]
    assert isinstance(root.model.embed_tokens, QuantEmbedding) and root.model.embed_tokens.bits == 8  # Q8_0
    assert root.lm_head.pw is root.model.embed_tokens.pw  # the tied head shares the table's bytes
    q = root.model.layers[3].self_attn.q_proj
    assert (q.bits, q.group_size) == (4, 32)  # Q4_1: the source file's grid
    assert torch.equal(q.weight, smollm.module.model.layers[3].self_attn.q_proj.weight.float())
    held = sum(b.numel() * b.element_size() for m in root.modules() if isinstance(m, (QuantLinear, QuantEmbedding))
               if m is not root.lm_head for b in (m.packed, m.scales, m.mins))
    assert held < 0.3 * sum(p.numel() * 4 for p in smollm.module.parameters())
    ids = smollm.tokenizer("The city council voted on Tuesday to", return_tensors="pt").input_ids
    with torch.no_grad():  # the default kernels: bfloat16 activations on torch's int4 kernel
        got, want = root(ids).logits.log_softmax(-1), smollm.module(ids).logits.log_softmax(-1)
    kl = (want.exp() * (want - got)).sum(-1).mean()
    assert kl <= 5e-3 and (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85, kl  # bfloat16's rounding only


def test_packed_loading_refuses_a_file_that_is_no_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(LensbenchError, match="is not a GGUF file"):
        lb.load(bad, packed=True)
    with pytest.raises(LensbenchError, match="a compressed-tensors folder that lensbench compress wrote or a GGUF"):
        lb.load(tmp_path / "missing.gguf", packed=True)
