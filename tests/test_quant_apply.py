"""Quantisation Plans applied for real: linear layers (and embeddings) are swapped for modules holding
packed codes, their outputs equal the dequantised ("fake-quant") model's, generation with the KV cache
works, bytes shrink as measured, the dense model comes back, and bad plans are refused up front."""
import json
import copy

import pytest
import torch
from torch import nn

from lensbench.compress.apply import apply
from lensbench.surgery import weight_bytes
from lensbench.errors import PlanError
from lensbench.gpu import reference
from lensbench.gpu.modules import QuantEmbedding, QuantLinear
from lensbench.gpu.quant import QuantError, quantize
from lensbench.compress.plan import Plan
from lensbench.profiling import model_card

ARCHS = ["llama", "gpt2", "qwen2", "bert"]


def fake_quant(model, targets):
    """The same network the obvious way: each targeted weight replaced by its dequantised copy."""
    module = copy.deepcopy(model.module)
    with torch.no_grad():
        for name, (bits, gs, scheme) in targets.items():
            w = module.get_submodule(name).weight
            if type(module.get_submodule(name)).__name__ == "Conv1D":  # weight stored [in, out]
                w.copy_(reference.dequantize(quantize(w.T, bits, gs, symmetric=scheme == "sym")).T)
            else:
                w.copy_(reference.dequantize(quantize(w, bits, gs, symmetric=scheme == "sym")))
    return module


def _ids(model, n=2, t=12):
    return torch.randint(5, model.module.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_block_quantisation_equals_fake_quant_and_restores(tiny, arch):
    model = tiny(arch)
    card = model_card(model)
    block = card["units"]["block"]
    plan = Plan.quantize(card, {block.format(i=0): (4, 32), block.format(i=1): (8, 64)})
    targets = plan.quant_targets(model)
    assert len(targets) >= 8  # every linear (GPT-2: Conv1D) of the two blocks
    ids = _ids(model)
    dense = model.module(input_ids=ids).logits if model.is_causal_lm else model.module(input_ids=ids)[0]
    expected_module = fake_quant(model, targets)
    expected = expected_module(input_ids=ids)
    expected = expected.logits if model.is_causal_lm else expected[0]
    with apply(model, plan):
        swapped = [n for n, m in model.module.named_modules() if isinstance(m, QuantLinear)]
        out = model.module(input_ids=ids)
        out = out.logits if model.is_causal_lm else out[0]
    assert sorted(swapped) == sorted(targets)
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, dense, atol=1e-4)  # quantisation did something
    after = model.module(input_ids=ids)
    after = after.logits if model.is_causal_lm else after[0]
    assert torch.equal(after, dense)  # the dense model is back


def test_generation_with_kv_cache_matches_fake_quant(tiny):
    model = tiny("llama")
    card = model_card(model)
    plan = Plan.quantize(card, {"re:.*layers\\.\\d+\\..*": (4, 32)})
    ids = _ids(model, 1, 8)
    ref = fake_quant(model, plan.quant_targets(model)).generate(ids, max_new_tokens=6, do_sample=False)
    with apply(model, plan):
        out = model.module.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)


def test_whole_model_int4_bytes_and_tied_head_shares_the_table(tiny):
    model = tiny("llama")
    emb = model.module.get_input_embeddings()
    head = model.module.get_output_embeddings()
    tied = head.weight.data_ptr() == emb.weight.data_ptr()
    card = model_card(model)
    names = {n: (4, 32) for n, m in model.module.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    plan = Plan.quantize(card, names)
    dense_bytes = weight_bytes(model.module)
    with apply(model, plan):
        q_bytes = weight_bytes(model.module)
        assert isinstance(model.module.get_input_embeddings(), QuantEmbedding)
        if tied:
            assert model.module.get_output_embeddings().packed is model.module.get_input_embeddings().packed
    params = sum(p.numel() for p in model.module.parameters())
    assert params * 4 <= dense_bytes <= params * 4 + 1024  # + small buffers (rotary frequencies)
    assert q_bytes < 0.2 * dense_bytes  # float32 -> 4.x bits (norm weights stay dense)
    assert weight_bytes(model.module) == dense_bytes


def test_requantisation_is_cached_across_entries(tiny):
    model = tiny("llama")
    plan = Plan.quantize(model_card(model), {model_card(model)["units"]["mlp"].format(i=0): (4, 32)})
    with apply(model, plan):
        first = [m.packed for m in model.module.modules() if isinstance(m, QuantLinear)]
    with apply(model, plan):
        second = [m.packed for m in model.module.modules() if isinstance(m, QuantLinear)]
    assert all(a is b for a, b in zip(first, second, strict=True))


def test_quantise_and_drop_in_one_plan(tiny):
    model = tiny("llama")
    card = model_card(model)
    u = card["units"]
    plan = Plan(actions={u["attn"].format(i=1): {"op": "drop"}, u["block"].format(i=0): {"op": "quant", "bits": 8,
                                                                                          "group_size": 32}},
                model=Plan.drop(card, []).model)
    ids = _ids(model)
    with apply(model, plan):
        model.module(input_ids=ids)
        assert any(isinstance(m, QuantLinear) for m in model.module.modules())


@pytest.mark.parametrize("action,msg", [
    ({"op": "quant", "bits": 7, "group_size": 32}, "bits=7"),
    ({"op": "quant", "bits": 4, "group_size": 20}, "multiple of 8"),
])
def test_bad_quant_actions_are_refused_on_load(tmp_path, tiny, action, msg):
    model = tiny("llama")
    doc = Plan.drop(model_card(model), []).to_dict()
    doc["actions"] = {"model.layers.0": action}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=msg):
        Plan.load(path)


def test_quant_names_the_model_lacks_are_refused_before_work(tiny):
    model = tiny("llama")
    plan = Plan.quantize(model_card(model), {"model.layers.0.mlp.not_there": (4, 32)})
    with pytest.raises(PlanError, match="no linear or embedding layer by that name"):
        plan.resolve(model)


def test_embedding_the_kernels_cannot_run_is_refused(tiny):
    model = tiny("gemma")  # Gemma scales its embedding lookup by sqrt(d)
    emb_name = next(n for n, m in model.module.named_modules() if m is model.module.get_input_embeddings())
    plan = Plan.quantize(model_card(model), {emb_name: (8, 32)})
    with pytest.raises(Exception, match="plain nn.Embedding"):
        with apply(model, plan):
            pass
    ids = _ids(model)
    model.module(input_ids=ids)  # nothing was left half-applied


def test_decode_runs_linears_reading_one_input_as_one_call_with_the_same_logits(tiny, monkeypatch):
    """q/k/v and gate/up are learnt as groups on the first decode step and run fused from the second: one
    kernel call each, logits as with separate calls."""
    from lensbench.gpu import dispatch, fusion

    model = tiny("llama")
    plan = Plan.quantize(model_card(model), {"re:.*layers\\.\\d+\\..*": (4, 32)})
    ids = _ids(model, 1, 8)

    def decode(steps=4):
        calls, logits = [], []
        real = dispatch.cpu_matmul
        monkeypatch.setattr(dispatch, "cpu_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
        with torch.no_grad(), apply(model, plan):
            out = model.module(input_ids=ids, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                calls.clear()
                out = model.module(input_ids=nxt, cache=out.cache, use_cache=True)
                logits.append(out.logits[0, -1])
                nxt = out.logits[:, -1:].argmax(-1)
            monkeypatch.setattr(dispatch, "cpu_matmul", real)
            return torch.stack(logits), len(calls)

    from lensbench.gpu import cpu_kernels

    fast, fast_calls = decode()  # torch's bfloat16 kernels (the first, learning step runs the exact ones)
    monkeypatch.setattr(cpu_kernels, "EXACT", True)  # the exact kernels everywhere: same arithmetic per row
    fused, fused_calls = decode()
    install = fusion.install
    monkeypatch.setattr(fusion, "install", lambda root, linears: (lambda: None))
    alone, alone_calls = decode()
    layers = model.module.config.num_hidden_layers
    assert alone_calls == 7 * layers and fused_calls == fast_calls == 4 * layers  # q,k,v | o | gate,up | down
    assert torch.allclose(fused, alone, rtol=0, atol=1e-5 * alone.abs().max().item())
    assert torch.allclose(fast, alone, rtol=0, atol=2e-2 * alone.abs().max().item())
    monkeypatch.setattr(fusion, "install", install)
    with apply(model, plan):  # a second entry reuses the groups' concatenated weights
        head = next(m for m in model.module.modules() if isinstance(m, QuantLinear))
        assert head.pw.__dict__.get("_fused")


def test_a_weight_without_a_kernel_on_its_device_is_refused_unless_slow_is_allowed(tiny, monkeypatch):
    from lensbench.compress import apply as apply_module
    from lensbench.gpu import dispatch

    pw3, pw4 = quantize(torch.randn(8, 32), 3, 16), quantize(torch.randn(8, 32), 4, 16)
    why = dispatch.missing_kernel(pw3, torch.device("cuda"))
    assert ("not int3" in why) if dispatch._have("triton") else ("Triton" in why)
    assert dispatch.missing_kernel(pw4, torch.device("cpu")) is None
    assert "mps" in dispatch.missing_kernel(pw4, torch.device("mps"))
    model = tiny("llama")
    plan = Plan.quantize(model_card(model), {"model.layers.0.mlp.down_proj": (3, 16)})
    # as on a CUDA device: no kernel for int3
    monkeypatch.setattr(apply_module, "missing_kernel", lambda pw, device: "no kernel for int3" if pw.bits == 3
                        else None)
    with pytest.raises(QuantError, match=r"model.layers.0.mlp.down_proj: no kernel for int3; or pass --allow-slow "
                       r"\(lensbench evaluate, generate\) or allow_slow=True"):
        with apply(model, plan):
            pass
    with apply(model, plan, allow_slow=True):
        pass
    with apply(model, plan.bind(model)._replace(allow_slow=True)):
        pass


def test_cli_evaluate_passes_allow_slow_to_the_evaluation(tmp_path, tiny_dir, monkeypatch, capsys):
    import lensbench
    from lensbench.cli import decisions, main
    from lensbench.errors import LensbenchError

    model_dir = str(tiny_dir("llama"))
    plan = Plan.quantize(model_card(lensbench.load(model_dir)), {"model.layers.0.mlp.down_proj": (3, 16)})
    plan.save(tmp_path / "plan.json")

    def stop(model, plan, cfg, **kwargs):  # the evaluation itself is tested elsewhere: only its config here
        raise LensbenchError(f"allow_slow={cfg.allow_slow}")

    monkeypatch.setattr(decisions, "evaluate", stop)
    argv = ["evaluate", model_dir, "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "e.json")]
    capsys.readouterr()
    assert main(argv) == 2 and "allow_slow=False" in capsys.readouterr().err
    assert main([*argv, "--allow-slow"]) == 2 and "allow_slow=True" in capsys.readouterr().err


def test_convert_keeps_only_the_packed_weights(tiny):
    import gc
    import weakref

    from lensbench.compress.apply import convert
    from lensbench.load import from_module
    from lensbench.numeric import storage_bytes
    from lensbench.surgery import Unit, weight_bytes

    base = tiny("llama")
    model = from_module(copy.deepcopy(base.module), base.tokenizer)
    plan = Plan.quantize(model_card(model), {f"model.layers.{i}": (4, 16) for i in range(model.n_layers)}
                         | {"model.embed_tokens": (8, 16), "lm_head": (8, 16)})
    ids = model.tokenize(["The cat sat on the mat."]).input_ids
    with torch.no_grad():
        with apply(model, plan):
            want = model.module(ids).logits
    dense = [weakref.ref(m.weight) for m in model.module.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    with pytest.raises(PlanError, match="cannot remove"):
        convert(model, Plan.drop(model_card(model), [Unit(0, "block")]))
    old_print = model.fingerprint()
    assert convert(model, plan, lean=True) is model
    gc.collect()
    assert all(ref() is None for ref in dense)  # no float copy of a quantised weight is kept anywhere
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.module.modules())
    assert model.fingerprint() != old_print
    packed = [m for m in model.module.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    assert all(m.pw.__dict__.get("lean") for m in packed)
    with torch.no_grad():
        got = model.module(ids).logits
        model.module.generate(ids, max_new_tokens=3, do_sample=False)  # decode steps on the exact kernels
    assert torch.allclose(got, want, atol=1e-4)
    assert not any("_torch_layout" in m.pw.__dict__ for m in packed)  # lean: no second copy of the codes
    fused = {id(w): w for m in packed for w in m.pw.__dict__.get("_fused", {}).values()}
    assert fused and not any("_torch_layout" in w.__dict__ for w in fused.values())  # nor of a fused group's
    # the members of a fused group (q/k/v, gate/up) are row views of its concatenated weight: one copy in memory
    groups = [t for w in fused.values() for t in (w.packed, w.scales, w.mins)]
    assert storage_bytes([*model.module.parameters(), *model.module.buffers(), *groups]) == weight_bytes(model.module)


def test_a_packed_models_fingerprint_reads_its_codes_not_a_dense_copy(tiny, monkeypatch):
    """Two quantisations of one model get different fingerprints (the packed codes and scales are hashed, not
    only the weights left dense), and fingerprinting never dequantises a weight (a whole table in float32)."""
    from lensbench.compress.apply import convert
    from lensbench.load import from_module

    prints = []
    for bits in (4, 8):
        model = from_module(copy.deepcopy(tiny("llama").module), tiny("llama").tokenizer)
        plan = Plan.quantize(model_card(model), {f"model.layers.{i}": (bits, 16) for i in range(model.n_layers)}
                             | {"model.embed_tokens": (8, 16)})
        convert(model, plan)
        for cls in (QuantLinear, QuantEmbedding):
            monkeypatch.setattr(cls, "weight", property(lambda self: pytest.fail("a dense copy was made")))
        prints.append(model.fingerprint())
        monkeypatch.undo()
    assert prints[0] != prints[1]
