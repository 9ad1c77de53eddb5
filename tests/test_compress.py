"""Saved checkpoints, checked by loading them in the consumer (transformers, llama.cpp) in a process that
never imports lensbench, against the logits of lensbench's in-memory plan."""
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import lensbench
from lensbench.gpu import cpu_kernels
from lensbench.compress.apply import apply
from lensbench.cli import main
from lensbench.compress.save import compress
from lensbench.errors import LensbenchError, PlanError
from lensbench.compress.plan import Plan, Quant
from lensbench.units import Unit
from lensbench.profiling import model_card

def consume(tmp_path, body: str, ids: torch.Tensor) -> np.ndarray:
    """Run `body` (which sets `logits` from `ids`) in a fresh Python and return the logits."""
    np.save(tmp_path / "ids.npy", ids.numpy())
    code = (f"import sys, numpy as np, torch\nids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r}))\n"
            + textwrap.dedent(body) + f"\nnp.save({str(tmp_path / 'got.npy')!r}, logits)\n"
            + "assert 'lensbench' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(tmp_path / "got.npy")


def planned_logits(model, plan, ids) -> np.ndarray:
    """The plan's logits in memory, on the exact float32 kernels (what a consumer computes from the saved weights;
    the default prefill tiles are bfloat16 where the CPU has bfloat16 dot products)."""
    with torch.no_grad(), apply(model, plan), cpu_kernels.exact_kernels():
        return model.module(ids).logits.float().numpy()


def ids_for(model, n=2, t=12):
    return torch.randint(5, model.module.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = p_logits - np.logaddexp.reduce(p_logits, -1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, -1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


HF_LOAD = """
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({path!r})
with torch.no_grad():
    logits = m(ids).logits.float().numpy()
"""


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_hf_checkpoint_of_drop_and_quant_plan_loads_in_transformers_with_the_same_logits(tiny, tmp_path, arch):
    model = tiny(arch)
    block = model.adapter.block_path(0)[:-1]
    plan = Plan.drop(model_card(model), [Unit(1, "block")])
    plan.actions[f"{block}2"] = Quant(4, group_size=16)
    plan.actions[f"{block}0"] = Quant(3, group_size=16, scheme="sym")
    saved = compress(model, plan, format="hf", out=tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == 2 and saved.record["layers_kept"] == [0, 2]
    if "layer_types" in cfg:  # per-layer lists keep the kept layers' entries
        assert cfg["layer_types"] == [model.module.config.layer_types[i] for i in (0, 2)]
    ids = ids_for(model)
    got = consume(tmp_path, HF_LOAD.format(path=str(tmp_path / "ck")), ids)
    assert np.abs(got - planned_logits(model, plan, ids)).max() <= 1e-3


def test_sublayer_plan_is_saved_in_lensbench_layout_and_reloads(tiny, tmp_path):
    model = tiny("llama")
    plan = Plan.drop(model_card(model), [Unit(0, "attn"), Unit(1, "block"), Unit(2, "mlp")])
    saved = compress(model, plan, format="hf", out=tmp_path / "ck")
    assert saved.record["layout"] == "lensbench" and "lensbench.load" in saved.record["note"]
    assert not (tmp_path / "ck" / "config.json").exists()  # no stock loader builds the full architecture
    back = lensbench.load(tmp_path / "ck")
    ids = ids_for(model)
    with torch.no_grad():
        got = back.module(ids).logits.numpy()
        with apply(model, plan):
            want = model.module(ids).logits.numpy()
            gen_want = model.module.generate(ids, max_new_tokens=4, do_sample=False)
        gen_got = back.module.generate(ids, max_new_tokens=4, do_sample=False)
    assert np.abs(got - want).max() <= 1e-5 and torch.equal(gen_got, gen_want)


def test_compressed_tensors_checkpoint_loads_in_transformers(tiny, tmp_path):
    model = tiny("llama")
    plan = Plan.drop(model_card(model), [Unit(1, "block")])
    plan.actions["model.layers.0"] = Quant(4, group_size=16, scheme="sym")
    plan.actions["model.layers.2.mlp"] = Quant(8, group_size=32, scheme="sym")
    plan.actions["model.layers.2.self_attn"] = Quant(5, group_size=16, scheme="sym")  # packed as 5-bit codes too
    saved = compress(model, plan, format="compressed-tensors", out=tmp_path / "ck")
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    assert saved.record["groups"] == {"int4/g16": 7, "int8/g32": 3, "int5/g16": 4}
    targets = sorted(t for g in qc["config_groups"].values() for t in g["targets"])
    assert "model.layers.1.mlp.down_proj" in targets  # block 2 renumbered to 1
    ids = ids_for(model)
    got = consume(tmp_path, HF_LOAD.format(path=str(tmp_path / "ck")), ids)
    assert np.abs(got - planned_logits(model, plan, ids)).max() <= 1e-3


def test_compressed_tensors_refuses_what_it_cannot_hold(tiny, tmp_path):
    model = tiny("llama")
    asym = Plan.quantize(model_card(model), {"model.layers.0": (4, 16)})
    with pytest.raises(PlanError, match="--scheme sym"):
        compress(model, asym, format="compressed-tensors", out=tmp_path / "a")
    uneven = Plan.quantize(model_card(model), {"model.layers.0.mlp.down_proj": (4, 48, "sym")})  # 64 inputs
    with pytest.raises(PlanError, match="--group-size 32"):
        compress(model, uneven, format="compressed-tensors", out=tmp_path / "b")
    sub = Plan.drop(model_card(model), [Unit(0, "mlp")])
    with pytest.raises(PlanError, match="mlp0.*--format hf"):
        compress(model, sub, format="gguf", out=tmp_path / "c")
    assert not any(tmp_path.iterdir())  # nothing written


def test_plan_of_another_model_and_non_empty_out_are_refused(tiny, tmp_path):
    llama, qwen = tiny("llama"), tiny("qwen2")
    plan = Plan.drop(model_card(llama), [Unit(1, "block")])
    with pytest.raises(PlanError, match="made for"):
        compress(qwen, plan, format="hf", out=tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(LensbenchError, match="--overwrite"):
        compress(llama, plan, format="hf", out=tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    compress(llama, plan, format="hf", out=tmp_path / "full", overwrite=True)
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "config.json").exists()


KILLED_WRITER = """
import sys, time
from lensbench.compress.formats import hf
from lensbench.compress import compress
from lensbench.compress.plan import Plan
from lensbench.testing import tiny_model

save = hf.save_weights
def slow(*a, **k):
    n = save(*a, **k)
    print("written", flush=True)
    time.sleep(60)
    return n
hf.save_weights = slow
m = tiny_model("llama")
compress(m, Plan.load(sys.argv[1]), format="hf", out=sys.argv[2], overwrite=True)
"""


def test_sigkill_mid_write_leaves_the_old_checkpoint_whole(tiny, tmp_path):
    model = tiny("llama")
    plan = Plan.drop(model_card(model), [Unit(1, "block")])
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "ck"
    compress(model, plan, format="hf", out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "plan.json"), str(out)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"  # the new weights are on disk, in the staging folder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]  # the dead writer's staging, never at out
    compress(model, plan, format="hf", out=out, overwrite=True)  # a rerun works and tidies up
    assert {p.name: p.read_bytes() for p in out.iterdir()}.keys() == before.keys()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ck.")]


def test_a_kill_between_the_two_renames_is_recovered(tiny, tmp_path):
    """publish_dir moves the old checkpoint aside, then the new one in; killed in between, `out` is missing for a
    moment: the next run puts the old checkpoint back before anything else."""
    model = tiny("llama")
    plan = Plan.drop(model_card(model), [Unit(1, "block")])
    out = tmp_path / "ck"
    compress(model, plan, format="hf", out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    out.rename(tmp_path / ".ck.old-12345")
    (tmp_path / ".ck.partial-12345").mkdir()
    with pytest.raises(LensbenchError, match="--overwrite"):  # the old checkpoint is back, so out is not empty
        compress(model, plan, format="hf", out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_cli_compress_writes_and_refuses_in_one_line(tiny_dir, tmp_path, capsys):
    src = tiny_dir("llama")
    model = lensbench.load(src)
    Plan.drop(model_card(model), [Unit(1, "block")]).save(tmp_path / "plan.json")
    assert main(["compress", str(src), "--plan", str(tmp_path / "plan.json"), "--format", "hf",
                 "--out", str(tmp_path / "ck")]) == 0
    assert "2 of 3 layers kept" in capsys.readouterr().out
    assert main(["compress", str(src), "--plan", str(tmp_path / "plan.json"), "--format", "hf",
                 "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert main(["compress", str(src), "--plan", str(tmp_path / "plan.json"), "--format", "gguf",
                 "--out", str(tmp_path / "g")]) == 0
    assert "tensors: 21 F32" in capsys.readouterr().out  # a drop-only plan keeps the float32 weights
    assert main(["compress", str(src), "--plan", str(tmp_path / "plan.json"), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "c")]) == 2
    assert "quantises nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(src), "--plan", str(tmp_path / "plan.json"), "--format", "hf", "--out",
              str(tmp_path / "z"), "--levels", "4"])
    assert exc.value.code == 2


# --- GGUF, on the bundled SmolLM2 (a Q4_1 GGUF) -----------------------------------------------
GGUF_LOAD = """
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({dir!r}, gguf_file={file!r})
with torch.no_grad():
    logits = m(ids).logits.float().numpy()
"""

LLAMA_CPP = """
from llama_cpp import Llama
llm = Llama({path!r}, logits_all=True, verbose=False, n_ctx=128, n_ubatch=1)
llm.eval(ids[0].tolist())
logits = np.array(llm.scores[: ids.shape[1]])[None]
llm.close()
"""


@functools.lru_cache(maxsize=1)
def llama_cpp_runs() -> str | None:
    """None when llama.cpp evaluates the bundled SmolLM2's own GGUF file (not one lensbench wrote) in a fresh
    process; else why not. A crash there is llama.cpp's build on this CPU, not a lensbench file (seen: a
    segfault in evaluation on an AVX-512/AMX host), so the tests that hand llama.cpp lensbench's files skip.
    Every evaluation here feeds one token per micro-batch (`n_ubatch=1`): on AMX hosts whose hypervisor does not
    enable AMX for the guest, llama.cpp's batched matmuls on the Q4_1 file die of an illegal instruction (the
    class of ggml-org/llama.cpp#28328), while one-token batches run and give the same logits."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (./run installs it from source)"
    from lensbench.bundled import resolve

    code = (f"from llama_cpp import Llama\nllm = Llama({str(resolve('smollm2-135m')[0])!r}, verbose=False, "
            f"n_ctx=64, n_ubatch=1)\nllm.eval([1, 504, 3575, 282])\nllm.close()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return (f"llama.cpp itself fails on this machine (exit {proc.returncode} evaluating the bundled SmolLM2 "
                f"GGUF, which lensbench did not write): rebuild llama-cpp-python for this CPU")
    return None


@pytest.fixture(scope="module")
def smollm_gguf(smollm, tmp_path_factory):
    """SmolLM2 with blocks 21 and 25 dropped, even blocks at Q4_K (rows of 576 fall back to Q4_0), odd
    blocks' down_proj at Q6_K, saved as GGUF."""
    plan = Plan.drop(model_card(smollm), [Unit(21, "block"), Unit(25, "block")])
    for i in range(0, 30, 2):
        plan.actions[f"model.layers.{i}"] = Quant(4, scheme="gguf")
    for i in range(1, 30, 2):
        plan.actions[f"model.layers.{i}.mlp.down_proj"] = Quant(6, scheme="gguf")
    out = tmp_path_factory.mktemp("gguf") / "ck"
    saved = compress(smollm, plan, format="gguf", out=out)
    ids = smollm.tokenize(["The city council approved the new budget on Tuesday after a long debate."]).input_ids
    return saved, plan, ids, planned_logits(smollm, plan, ids)


def test_gguf_types_metadata_and_bits(smollm_gguf):
    import gguf

    saved, _, _, _ = smollm_gguf
    r = saved.record
    reader = gguf.GGUFReader(saved.path / r["file"])
    assert reader.fields["llama.block_count"].contents() == 28
    assert "blk.27.ffn_down.weight" in {t.name for t in reader.tensors}
    assert "blk.28.attn_q.weight" not in {t.name for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_K"  # 1536 inputs: a K-quant fits
    assert types["blk.0.attn_q.weight"] == "Q4_0"  # 576 inputs: the documented fallback
    assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["blk.1.attn_q.weight"] == "Q4_1"  # source type kept
    assert r["tensor_types"] == {k: sum(v == k for v in types.values()) for k in set(types.values())}
    assert 4.5 < r["bits_per_weight"] < 8.5


def test_gguf_reads_back_in_transformers_with_the_plans_distribution(smollm_gguf, tmp_path):
    saved, _, ids, want = smollm_gguf
    got = consume(tmp_path, GGUF_LOAD.format(dir=str(saved.path), file=saved.record["file"]), ids)
    assert kl(want, got) < 1e-6 and np.abs(got - want).max() <= 1e-3


def test_gguf_runs_in_llama_cpp(smollm_gguf, tmp_path):
    if llama_cpp_runs() is not None:
        pytest.skip(llama_cpp_runs())
    saved, _, ids, want = smollm_gguf
    got = consume(tmp_path, LLAMA_CPP.format(path=str(saved.path / saved.record["file"])), ids)
    # llama.cpp quantises activations to 8 bits for its quantised matmuls, so it is close, not equal: its top token
    # may differ where the plan's two best logits are within that noise, nowhere else
    assert kl(want, got) < 0.05
    top2 = np.sort(want, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 0.5
    assert clear.mean() >= 0.5 and (got.argmax(-1) == want.argmax(-1))[clear].all()


def test_gguf_refuses_other_schemes(smollm, tmp_path):
    plan = Plan.quantize(model_card(smollm), {"model.layers.0": (4, 32)})
    with pytest.raises(PlanError, match="--scheme gguf"):
        compress(smollm, plan, format="gguf", out=tmp_path / "x")


# --- the K-quant quantisers, byte for byte against gguf's dequantiser ----------------------------
@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_decode_in_gguf_to_their_own_grid(qtype):
    from gguf import quants

    from lensbench.gpu import ggml

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 512)) * rng.uniform(0.01, 1, (8, 1))).astype(np.float32)
    w[0, :256] = 0.0  # an all-zero super-block
    w[1, 5] = 40.0  # an outlier
    data = ggml.quantize(w, qtype)
    assert data.shape == (8, 512 // 256 * {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[qtype])
    back = quants.dequantize(data, ggml._qtype(qtype))
    assert np.all(back[0, :256] == 0)
    levels = {"Q2_K": 4, "Q3_K": 8, "Q4_K": 16, "Q5_K": 32, "Q6_K": 64}[qtype]
    err = np.abs(back - w).reshape(8, -1, 256)
    span = np.abs(w.reshape(err.shape)).max(-1, keepdims=True)
    # each value within two grid steps of its super-block's (the sub-block scales are themselves quantised)
    assert np.all(err <= 2 * 2 * span / (levels - 1) + 1e-6)
    rel = np.sqrt(((back - w) ** 2).mean() / (w ** 2).mean())
    # the error of gguf's own 32-value types, scaled by the grid's levels: a wrong layout is far off
    legacy, factor = {"Q2_K": ("Q4_0", 4.5), "Q3_K": ("Q4_0", 2.5), "Q4_K": ("Q4_1", 1.3), "Q5_K": ("Q5_1", 1.3),
                      "Q6_K": ("Q8_0", 4.5)}[qtype]
    ref = np.sqrt(((ggml.roundtrip(w, legacy) - w) ** 2).mean() / (w ** 2).mean())
    assert rel < factor * ref


def test_ggml_type_choice_and_refusals():
    from lensbench.gpu import ggml

    assert ggml.ggml_type(4, 1536) == "Q4_K" and ggml.ggml_type(4, 576) == "Q4_0"
    assert ggml.ggml_type(6, 576) == "Q8_0" and ggml.ggml_type(5, 512) == "Q5_K"
    assert ggml.ggml_type(3, 512) == "Q3_K" and ggml.ggml_type(2, 576) == "Q4_0"
    with pytest.raises(ggml.GGMLError, match="use one of 2, 3, 4, 5, 6, 8"):
        ggml.ggml_type(7, 512)
    assert ggml.bits_per_weight("Q4_K") == 4.5 and ggml.bits_per_weight("Q6_K") == 6.5625


# --- GGUF from a Hugging Face model (header from its config and tokenizer) -------------------------
def tiny_qwen3():
    import transformers as T

    from lensbench.load import from_module
    from lensbench.testing import tiny_tokenizer

    torch.manual_seed(0)
    # head_dim 128 as in the real Qwen3 models: transformers' GGUF reader ignores attention.key_length for qwen3
    # and always builds 128-wide heads
    cfg = T.Qwen3Config(vocab_size=600, max_position_embeddings=128, hidden_size=32, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=128, num_hidden_layers=3, intermediate_size=64)
    return from_module(T.Qwen3ForCausalLM(cfg).eval(), tokenizer=tiny_tokenizer())


HF_GGUF_CHECK = """
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({dir!r}, gguf_file={file!r})
with torch.no_grad():
    hf = m(ids).logits[0].float().numpy()
try:
    if not {use_llama}:
        raise ImportError("llama.cpp does not run on this machine")
    from llama_cpp import Llama
    llm = Llama({dir!r} + "/" + {file!r}, logits_all=True, verbose=False, n_ctx=64, n_ubatch=1)
    llm.eval(ids[0].tolist())
    cpp = np.array(llm.scores[: ids.shape[1]])
    llm.close()
except ImportError:
    cpp = np.full_like(hf, np.nan)
logits = np.stack([hf, cpp])
"""


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_gguf_from_a_hugging_face_model_loads_in_transformers_and_llama_cpp(tiny, tmp_path, arch):
    model = tiny_qwen3() if arch == "qwen3" else tiny(arch)
    plan = Plan.drop(model_card(model), [Unit(1, "block")])
    plan.actions["model.layers.0"] = Quant(8, scheme="gguf")  # 32 inputs: Q8_0
    saved = compress(model, plan, format="gguf", out=tmp_path / "ck")
    assert saved.record["header_from"] == "transformers config"
    assert saved.record["tensor_types"]["Q8_0"] == 7
    ids = torch.randint(5, 490, (1, 10), generator=torch.Generator().manual_seed(0))
    want = planned_logits(model, plan, ids)[0]
    hf, cpp = consume(tmp_path, HF_GGUF_CHECK.format(dir=str(saved.path), file=saved.record["file"],
                                                     use_llama=llama_cpp_runs() is None), ids)
    assert np.abs(hf - want).max() <= 1e-4
    if np.isnan(cpp).all():
        pytest.skip(f"{llama_cpp_runs()}; transformers' reader checked")
    # llama.cpp rounds activations to 8 bits for its Q8_0 matmuls: close, the same greedy tokens
    assert np.abs(cpp - want).max() <= 0.05 and (cpp.argmax(-1) == want.argmax(-1)).all()


def test_gguf_from_an_unsupported_hugging_face_family_is_refused(tiny, tmp_path):
    model = tiny("gpt2")
    plan = Plan.drop(model_card(model), [Unit(1, "block")])
    with pytest.raises(LensbenchError, match="'gpt2' model is not written yet.*convert_hf_to_gguf"):
        compress(model, plan, format="gguf", out=tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("fmt", ["hf", "gguf", "compressed-tensors"])
def test_evaluate_a_saved_model_against_its_dense_source(tiny_dir, tmp_path, capsys, fmt):
    src = tiny_dir("llama")
    model = lensbench.load(src)
    plan = Plan.drop(model_card(model), [Unit(1, "block")])
    plan.actions["model.layers.0"] = Quant(8, scheme="gguf") if fmt != "compressed-tensors" \
        else Quant(4, group_size=16, scheme="sym")
    plan.save(tmp_path / "plan.json")
    assert main(["compress", str(src), "--plan", str(tmp_path / "plan.json"), "--format", fmt,
                 "--out", str(tmp_path / "ck")]) == 0
    args = ["evaluate", str(tmp_path / "ck"), "--dense", str(src), "--out", str(tmp_path / "e.json"), "--n-texts", "2",
            "--cities", "4", "--speed-rounds", "1", "--decode-tokens", "2"]
    assert main(args) == 0
    assert "the same plan in memory" in capsys.readouterr().out
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["kl_to_dense"] > 0 and r["kl_to_dense"] == pytest.approx(r["in_memory_plan"]["kl_to_dense"], rel=1e-3)
    other = tiny_dir("qwen2")
    assert main(args[:3] + [str(other)] + args[4:]) == 2  # the saved model's plan is of another model
    assert "made for" in capsys.readouterr().err
    assert main(args + ["--plan", str(tmp_path / "plan.json")]) == 2


# --- GGUF of the bundled Gemma-3-270M (optional: ./run gemma) --------------------------------------------------
def test_gemma3_gguf_reads_back_in_transformers_and_llama_cpp(tmp_path):
    """Gemma's norms scale by 1 + w: llama.cpp stores 1 + w and transformers' reader subtracts the 1, so the writer
    adds it back (a file written with transformers' w read as garbage in llama.cpp: perplexity in the billions)."""
    import lensbench
    from lensbench.errors import LensbenchError

    try:
        gemma = lensbench.load("gemma3-270m")
    except LensbenchError as exc:
        pytest.skip(str(exc))
    plan = Plan.quantize(model_card(gemma), {"model.layers.0": Quant(8, scheme="gguf")})
    saved = compress(gemma, plan, format="gguf", out=tmp_path / "ck")
    ids = gemma.tokenize(["The city council approved the new budget on Tuesday after a long debate."]).input_ids
    want = planned_logits(gemma, plan, ids)[0]
    hf, cpp = consume(tmp_path, HF_GGUF_CHECK.format(dir=str(saved.path), file=saved.record["file"],
                                                     use_llama=llama_cpp_runs() is None), ids)
    assert kl(want[None], hf[None]) < 1e-6
    if np.isnan(cpp).all():
        pytest.skip(f"{llama_cpp_runs()}; transformers' reader checked")
    # llama.cpp rounds activations to 8 bits for its quantised matmuls: close, the same greedy tokens
    assert kl(want[None], cpp[None]) < 0.05 and (cpp.argmax(-1) == want.argmax(-1)).mean() >= 0.9
