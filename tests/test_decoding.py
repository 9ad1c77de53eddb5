"""The compiled decoder (`lensbench.decoding.Decoder`): its greedy tokens are those of transformers' own
`generate` on the same model, dense and packed (torch's int4/int8 kernels, the numba op, mixed widths, a packed
embedding and LM head), the compiled graph does not break at the kernels, and what it cannot run is refused in
one line."""
import pytest
import torch
from torch import nn

from lensbench.compress.apply import apply, convert
from lensbench.compress.plan import Plan, Quant
from lensbench.decoding import DecodeError, Decoder
from lensbench.gpu import compiled, cpu_native
from lensbench.gpu.modules import PackedModule
from lensbench.profiling import model_card
from lensbench.testing import tiny_model

PROMPT = 10
NEW = 6


def _ids(model, batch=1):
    g = torch.Generator().manual_seed(1)
    return torch.randint(5, model.module.config.vocab_size, (batch, PROMPT), generator=g)


def _eager(model, ids):
    return model.module.generate(ids, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)


def _plan(model, spec):
    """Every block linear, the LM head and the embedding at `spec(name)`."""
    names = [n for n, m in model.module.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    return Plan.quantize(model_card(model), {n: spec(n) for n in names})


def _mixed(k):
    """BAQ-style widths per input group of 8 columns (`gpu.mixed`)."""
    widths = (4, 2, 3, 8, 4, 2, 3, 4)[: k // 8]
    return Quant(max(widths), 8, group_bits=widths)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=3, attn="sdpa")


def test_dense_tokens_equal_transformers_generate(llama):
    ids = _ids(llama, batch=2)
    dec = Decoder(llama, max_length=32)
    assert torch.equal(dec.generate(ids, NEW), _eager(llama, ids))
    assert dec.timings["decode_steps"] == NEW - 1 and dec.timings["prompt_tokens"] == PROMPT
    # a second call reuses the cache and the compiled step; held on one thread it decodes the same tokens
    dec.threads = 1
    assert torch.equal(dec.generate(ids[:, :7], NEW), _eager(llama, ids[:, :7]))
    assert llama.module.config._attn_implementation == "sdpa"  # the steps ran eager attention; the model's is back
    plain = Decoder(llama, max_length=32, step_attention=None, cpp_wrapper=False)  # the plain compiled step
    assert torch.equal(plain.generate(ids, NEW), _eager(llama, ids))
    one_file = Decoder(llama, max_length=32, threads=2, separate_build=False)  # C++ wrapper and kernels built together
    assert torch.equal(one_file.generate(ids, NEW), _eager(llama, ids))


def test_steps_read_rotary_tables_of_the_modules_own_values(llama):
    from lensbench.decoding import RotaryTables

    tables = RotaryTables(llama.module, 32)
    (rotary, _), = tables.modules.items()
    pos, x = torch.tensor([[0], [7], [31]]), torch.zeros(1)
    want = rotary(x, pos)
    with tables.reading():
        got = rotary(x, pos)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert "forward" not in rotary.__dict__  # the module's own forward is back
    own, rotary.rope_type = rotary.rope_type, "dynamic"  # frequencies that depend on the length: not tabulated
    try:
        assert not RotaryTables(llama.module, 32).modules
    finally:
        rotary.rope_type = own


@pytest.mark.parametrize("case", ["int4", "int4-native", "int8-sym-row", "mixed-widths", "int3-exact"])
def test_packed_tokens_equal_eager_apply(llama, case, monkeypatch):
    specs = {
        "int4": lambda n: (4, 32, "asym"),  # torch's int4 kernel (the native one off), fused q/k/v and gate/up
        "int4-native": lambda n: (4, 64, "asym"),  # the native kernel
        "int8-sym-row": lambda n: (8, -1, "sym") if "embed" not in n else (8, 32, "asym"),  # torch's int8 kernel
        "mixed-widths": lambda n: (_mixed(64 if "down" in n else 32) if "proj" in n else (3, 16, "asym")),
        "int3-exact": lambda n: (3, 16, "asym"),  # the numba custom op
    }
    ids = _ids(llama)
    if case in ("int4", "int8-sym-row"):
        monkeypatch.setattr(cpu_native, "_enabled", False)
    with apply(llama, _plan(llama, specs[case])):
        want = _eager(llama, ids)
        dec = Decoder(llama, max_length=32)
        assert torch.equal(dec.generate(ids, NEW), want)
        linears = [m for m in llama.module.modules() if isinstance(m, PackedModule) and compiled.prepared(m)]
        assert linears
        if case in ("int4", "int8-sym-row"):
            assert dec.kernels.get("torch4", 0) + dec.kernels.get("torch8", 0) > 0
            # the matmul kernel turned off, not the attention: the same steps apart from the linears
            assert dec.step_attention == ("native" if cpu_native.library_available() else "eager")
        if case == "int4-native" and cpu_native.available():
            assert set(dec.kernels) == {"native"}  # every linear; the embedding table is looked up
        dec.close()
        assert not any(compiled.prepared(m) for m in llama.module.modules())


@pytest.mark.parametrize("step_attention", ["sdpa", "native"])
def test_the_step_is_one_graph(llama, step_attention):
    """The packed kernels are traced into the graph (aten ops or the custom ops), never a graph break."""
    import torch._dynamo as dynamo

    from lensbench.decoding import attention

    if step_attention == "native" and not cpu_native.available():
        pytest.skip(cpu_native.unavailable())
    with apply(llama, _plan(llama, lambda n: (4, 32, "asym") if "proj" in n else (3, 16, "asym"))):
        dec = Decoder(llama, max_length=32, step_attention=step_attention)  # prepares the modules
        out = llama.module(input_ids=_ids(llama), use_cache=True)
        step = dict(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
        with attention(llama.module, dec._attention):
            explained = dynamo.explain(llama.module.forward)(**step)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_converted_model(llama):
    import copy

    model = copy.deepcopy(llama)
    model.module = copy.deepcopy(llama.module)
    ids = _ids(model)
    convert(model, _plan(model, lambda n: (4, 32, "asym")))
    assert torch.equal(Decoder(model, max_length=32).generate(ids, NEW), _eager(model, ids))


def test_bad_input_is_one_line(llama, minilm):
    with pytest.raises(DecodeError, match="no LM head"):
        Decoder(minilm)
    with pytest.raises(DecodeError, match="step_attention must be one of sdpa, eager, native, auto or None"):
        Decoder(llama, step_attention="flash_attention_2")
    with pytest.raises(DecodeError, match="threads must be a positive count or None"):
        Decoder(llama, threads=0)
    dec = Decoder(llama, max_length=12, compile=False)
    with pytest.raises(DecodeError, match="max_length=16 or more"):
        dec.generate(_ids(llama), 6)
    with pytest.raises(DecodeError, match="LongTensor"):
        dec.generate(_ids(llama)[0], 2)
    handle = llama.module.model.layers[0].register_forward_hook(lambda *a: None)
    try:
        with pytest.raises(DecodeError, match="model.layers.0.*forward hooks"):
            Decoder(llama)
    finally:
        handle.remove()


def test_cli_generate_with_a_plan(capsys, tmp_path, tiny_dir):
    import lensbench
    from lensbench.cli import main

    model_dir = str(tiny_dir("llama"))
    model = lensbench.load(model_dir)
    plan = _plan(model, lambda n: (4, 32, "asym")).save(tmp_path / "plan.json")
    capsys.readouterr()
    assert main(["generate", model_dir, "--plan", str(plan), "--prompt", "The report said", "--new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "compiled" in err and "tokens/s decode" in err and "first call compiles" in err
    assert main(["generate", model_dir, "--prompt", "x", "--new-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--new-tokens must be 1 or more" in err[0]


def test_cli_generate_refuses_a_weight_without_a_kernel_unless_allow_slow(capsys, tmp_path, tiny_dir, monkeypatch):
    import lensbench
    from lensbench.cli import main
    from lensbench.compress import apply as apply_module

    model_dir = str(tiny_dir("llama"))
    plan = _plan(lensbench.load(model_dir), lambda n: (3, 32, "asym")).save(tmp_path / "plan.json")
    # as on a CUDA device, where no kernel runs int3
    monkeypatch.setattr(apply_module, "missing_kernel", lambda pw, device: "no kernel for int3" if pw.bits == 3
                        else None)
    argv = ["generate", model_dir, "--plan", str(plan), "--prompt", "The report said", "--new-tokens", "3", "--eager"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no kernel for int3" in err[0] and "--allow-slow" in err[0] and "model.layers." in err[0]
    assert main([a for a in argv if a != "--eager"]) == 2  # compiled: refused before the compile's notice too
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main([*argv, "--allow-slow"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "eager" in err
    assert main(["generate", model_dir, "--prompt", "x", "--allow-slow"]) == 2
    assert "--allow-slow applies to a plan" in capsys.readouterr().err


def test_a_model_changed_after_its_decoder_was_made_is_refused(llama):
    """The compiled step does not guard the model's modules (`_input_guards`): `generate` refuses a model whose
    modules or tensors are no longer those its Decoder was made for, and hooks added since."""
    ids = _ids(llama)
    with apply(llama, _plan(llama, lambda n: (4, 32, "asym"))):
        packed = Decoder(llama, max_length=32)
    with pytest.raises(DecodeError, match="changed after its Decoder was made.*make a new Decoder"):
        packed.generate(ids, 2)  # the packed modules were swapped back out
    dense = Decoder(llama, max_length=32)
    handle = llama.module.model.layers[0].register_forward_hook(lambda *a: None)
    try:
        with pytest.raises(DecodeError, match="model.layers.0.*forward hooks"):
            dense.generate(ids, 2)
    finally:
        handle.remove()
    norm = llama.module.model.norm
    norm.to(torch.float64)  # the same Parameter object, cast in place
    try:
        with pytest.raises(DecodeError, match="changed after its Decoder was made"):
            dense.generate(ids, 2)
    finally:
        norm.to(torch.float32)
    assert torch.equal(dense.generate(ids, NEW), _eager(llama, ids))  # as it was made for: runs
