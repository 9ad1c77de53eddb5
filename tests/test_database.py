"""The GPTQ database (EvoPress's design): every block linear at every level from the dense model's Hessians,
stored packed; its scores as rankings; the bit policies measuring and writing its levels; evaluate and compress
applying them; resume, workers and bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lensbench.gpu import cpu_kernels
from lensbench.agreement import refresh
from lensbench.compress.apply import apply
from lensbench.compress.database import Database, DatabaseConfig, build, prepare
from lensbench.compress.gptq import GPTQConfig, block_hessians, gptq_weight
from lensbench.compress.policies import make_plan
from lensbench.errors import PlanError
from lensbench.executor import ExecutorConfig
from lensbench.gpu.quant import QuantError
from lensbench.profiling import profile_model
from lensbench.simquant import block_linears, simulated
from lensbench.testing import SAMPLE_TEXTS

CFG = DatabaseConfig(levels=(2, 4, 8), group_size=16, gptq=GPTQConfig(batch_size=4, seq_len=64), kl_texts=2,
                     kl_seq_len=32)
TEXTS = list(SAMPLE_TEXTS)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from lensbench.testing import tiny_model

    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("db") / "db"
    return model, build(model, TEXTS, folder, CFG)


def test_every_entry_is_gptq_of_the_dense_hessian_stored_packed(built):
    model, db = built
    names = [f"{model.adapter.block_path(i)}.{n}" for i in range(model.n_layers) for n in block_linears(model)]
    for i, mine, h, shared in block_hessians(model, names, TEXTS, CFG.gptq):
        assert set(shared) >= {n for n in mine if n.endswith(("k_proj", "v_proj"))}  # one Hessian for q, k, v
        for name, module in mine.items():
            for b in CFG.levels:
                want = gptq_weight(module.weight, h[name].float(), b, 16, False, CFG.gptq)
                got = db.packed(name, b)
                assert torch.equal(got.packed, want.packed.packed) and torch.equal(got.scales, want.packed.scales)
                row = db.doc["errors"][str(b)][i][name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]]
                assert row["error"] == pytest.approx(want.error, rel=1e-9)
                assert row["error"] <= row["rtn_error"] * (1 + 1e-9)  # GPTQ never worse than RTN on its Hessian
    files = list((db.folder / "hessians").glob("*.safetensors"))
    assert len(files) == model.n_layers


def test_scores_rank_and_join_the_agreement_matrix(built):
    model, db = built
    prof = profile_model(model, TEXTS, analyses=["quant_sensitivity"], progress=False, seq_len=32,
                         analysis_params={"quant_sensitivity": {"bits": (2, 4), "group_size": 16}})
    prof.merge(db.profile())
    refresh(prof)
    names = prof["ranking_agreement"].params["rankings"]
    assert {"hawq_block_int2", "gptq_nmse_block_int2", "augmented_block_int2", "gptq_kl_block_int2",
            "quant_kl_block_int2"} <= set(names)
    s = prof["gptq_nmse_block_int2"].values
    assert np.all(s > 0) and np.all(prof["gptq_nmse_block_int8"].values < s)  # more bits, less error
    err, norm = db.table(4, "error"), db.table(4, "norm")
    assert prof["gptq_nmse_block_int4"].values == pytest.approx(err.sum(1) / norm.sum(1))
    kl = np.array(db.doc["kl_block"]["2"])
    assert np.all(kl > 0) and np.all(np.array(db.doc["kl_block"]["8"]) < kl)


def test_the_measured_kl_is_the_block_at_that_level_from_the_database(built):
    from lensbench.calibration import CalibrationKL

    model, db = built
    kl = CalibrationKL(model, TEXTS[:2], 4, 32)
    block = model.adapter.block_path(1)
    with simulated(model, {f"{block}.{n}": (2, 16, "asym") for n in db.linears}, db.weights(model)):
        assert kl.changed(1) == pytest.approx(db.doc["kl_block"]["2"][1], rel=1e-9)


def _profile(model):
    return profile_model(model, TEXTS, analyses=["redundancy"], progress=False, seq_len=32)


@pytest.mark.parametrize("policy,options", [
    ("bits-dp", {"error": "nmse", "unit": "linear", "levels": "2,4,8"}),
    ("bits-dp", {"levels": "2,4,8"}),
    ("bits-rank", {"ranking": "hessian", "levels": "4,2"}),
    ("bits-rank", {"ranking": "hawq", "levels": "4,2"}),
    ("bits-rank", {"ranking": "augmented", "levels": "4,2"}),
    ("bits-rank", {"ranking": "gptq-kl", "levels": "4,2"}),
    ("evo-bits", {"levels": "2,4,8", "generations": 2, "offspring": 2}),
    ("bits-baq", {"levels": "2,4,8"}),
])
def test_bit_policies_plan_from_the_database_and_evaluate_applies_its_weights(built, policy, options):
    model, db = built
    plan = make_plan(policy, _profile(model), 3.0, model=model, texts=TEXTS, group_size=16, method="gptq",
                     database=str(db.folder), **options)
    quant = plan.quant_actions()
    assert {q.method for q in quant.values()} == {"gptq"} and plan.meta["database"]["key"] == db.key
    assert plan.predicted["average_bits"] <= 3.0 + 1e-9
    bound = plan.bind(model)
    summary = prepare(model, bound, [])  # no calibration text needed: the levels come from the database
    assert summary == {"layers": len(bound.quant), "database": str(db.folder)}
    ids = model.tokenize(TEXTS[:2]).model_inputs()
    with torch.no_grad():
        with apply(model, plan), cpu_kernels.exact_kernels():  # the same weights, compared in float32
            got = model.module(**ids).logits
        with simulated(model, bound.quant, db.weights(model)):
            want = model.module(**ids).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_bisect_measures_the_database_levels(built):
    model, db = built
    plan = make_plan("bits-bisect", _profile(model), 1.0, model=model, texts=TEXTS, group_size=16, method="gptq",
                     database=str(db.folder), levels="8,2", ranking="gptq-kl")
    assert plan.meta["database"]["folder"] == str(db.folder)
    assert plan.meta["search"]["evaluations"] >= 2


def test_refused_for_another_model_grid_level_or_method(built, tiny):
    model, db = built
    prof = _profile(model)
    other = tiny("gpt2")
    with pytest.raises(PlanError, match="is of 'tiny-llama'.*not of 'tiny-gpt2'"):
        make_plan("bits-rank", _profile(other), 3.0, model=other, group_size=16, method="gptq",
                  database=str(db.folder), ranking="hawq")
    with pytest.raises(PlanError, match="holds GPTQ on group 16 asym, not the group 32 asym"):
        make_plan("bits-rank", prof, 3.0, model=model, group_size=32, method="gptq", database=str(db.folder))
    with pytest.raises(PlanError, match="holds levels 2,4,8, not 3"):
        make_plan("bits-rank", prof, 3.5, model=model, group_size=16, method="gptq", levels="4,3",
                  database=str(db.folder))
    with pytest.raises(PlanError, match="add --method gptq"):
        make_plan("bits-rank", prof, 3.0, model=model, group_size=16, database=str(db.folder))
    with pytest.raises(PlanError, match="nmse error comes from a GPTQ database"):
        make_plan("bits-dp", prof, 3.0, model=model, group_size=16, error="nmse")
    with pytest.raises(PlanError, match="quant-db"):
        make_plan("bits-rank", prof, 3.0, model=model, group_size=16, ranking="hawq")


def test_a_plan_whose_database_is_gone_says_so(built, tmp_path):
    model, db = built
    plan = make_plan("bits-rank", _profile(model), 3.0, model=model, group_size=16, method="gptq",
                     database=str(db.folder), ranking="hessian")
    plan.meta["database"]["folder"] = str(tmp_path / "gone")
    with pytest.raises(PlanError, match="not there: rebuild it"):
        prepare(model, plan.bind(model), TEXTS)
    assert "database" not in plan.with_method("gptq").meta  # --method gptq runs GPTQ afresh


def test_bad_settings_and_folders_are_refused(built, tmp_path):
    model, db = built
    with pytest.raises(QuantError, match="level 7 has no GGUF type"):
        DatabaseConfig(levels=(4, 7), scheme="gguf").check()
    with pytest.raises(QuantError, match="bits=7"):
        DatabaseConfig(levels=(7,)).check()
    with pytest.raises(PlanError, match="other settings"):
        build(model, TEXTS[:3], db.folder, CFG)
    with pytest.raises(PlanError, match="is not a GPTQ database"):
        Database.open(tmp_path)


def test_a_killed_build_resumes_and_workers_build_the_same(built, tmp_path):
    model, db = built
    folder = tmp_path / "db"
    cfg = DatabaseConfig(levels=(2, 4), group_size=16, gptq=CFG.gptq, kl_texts=2, kl_seq_len=32)
    first = build(model, TEXTS, folder, cfg)
    (folder / "database.json").unlink()  # as if killed before the end: some items finished, the manifest not
    for f in sorted((folder / "kl-items").glob("item-*.json"))[2:]:
        f.unlink()
    (folder / "levels" / "L0001-int4.safetensors").write_bytes(b"truncated")
    sorted((folder / "items").glob("item-*.json"))[-1].unlink()  # ... its item was not recorded either
    again = build(model, TEXTS, folder, cfg)
    assert again.doc["errors"] == first.doc["errors"] and again.doc["kl_block"] == first.doc["kl_block"]
    assert torch.equal(again.packed("model.layers.1.mlp.down_proj", 4).packed,
                       first.packed("model.layers.1.mlp.down_proj", 4).packed)
    workers = build(model, TEXTS, tmp_path / "db2", cfg, executor=ExecutorConfig("process", 2))
    assert workers.doc["errors"] == first.doc["errors"]
    for name in workers.where:
        assert torch.equal(workers.packed(name, 2).packed, first.packed(name, 2).packed)
    assert np.allclose(workers.doc["kl_block"]["2"], first.doc["kl_block"]["2"], rtol=1e-5)


def test_the_cli_builds_a_database_and_plans_from_it(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    run = [sys.executable, "-m", "lensbench"]
    out = subprocess.run(run + ["quant-db", str(src), "--out", str(tmp_path / "db"), "--levels", "2,4",
                                "--group-size", "16", "--calib", "4", "--seq-len", "64", "--kl-texts", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "largest dampening used" in out.stdout
    plan = subprocess.run(run + ["plan", str(tmp_path / "db" / "profile"), "--policy", "bits-rank", "--budget", "3",
                                 "--levels", "4,2", "--group-size", "16", "--method", "gptq", "--ranking", "hawq",
                                 "--database", str(tmp_path / "db"), "--model", str(src),
                                 "--out", str(tmp_path / "p.json")], capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    assert json.loads((tmp_path / "p.json").read_text())["meta"]["database"]["folder"] == str(tmp_path / "db")
    baq = run + ["plan", str(tmp_path / "db" / "profile"), "--policy", "bits-baq", "--budget", "3", "--levels", "2,4",
                 "--group-size", "16", "--method", "gptq", "--database", str(tmp_path / "db"), "--model", str(src),
                 "--out", str(tmp_path / "baq.json")]
    plan = subprocess.run(baq, capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    doc = json.loads((tmp_path / "baq.json").read_text())
    assert doc["predicted"]["average_bits"] <= 3 and doc["meta"]["database"]["folder"] == str(tmp_path / "db")
    wrong = subprocess.run(baq + ["--reference", "8"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--reference 8" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    bad = subprocess.run(run + ["quant-db", str(src), "--out", str(tmp_path / "x"), "--levels", "4,7"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "level 7" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_a_gguf_database_holds_the_ggml_bytes_that_compress_writes(tiny, tmp_path):
    """With the gguf scheme each level is GPTQ onto the GGML type the bits map to (Q4_0 and Q8_0 for the tiny
    model's 32- and 64-wide rows), stored as the bytes a GGUF file holds; a plan made from it needs no GPTQ run, and
    compress writes exactly those bytes into the GGUF file."""
    import gguf

    from lensbench.compress.gptq import solve
    from lensbench.compress.save import compress

    model = tiny("llama")
    cfg = DatabaseConfig(levels=(4, 8), group_size=16, scheme="gguf", gptq=CFG.gptq, kl_texts=2, kl_seq_len=32)
    db = build(model, TEXTS, tmp_path / "db", cfg)
    assert db.group_size == 0 and "the GGUF types" in db.describe()
    names = [f"{model.adapter.block_path(i)}.{n}" for i in range(model.n_layers) for n in block_linears(model)]
    for _, mine, h, _ in block_hessians(model, names, TEXTS, CFG.gptq):
        for name, module in mine.items():
            for b, qtype in ((4, "Q4_0"), (8, "Q8_0")):
                got = db.packed(name, b)
                assert got.qtype == qtype
                want = solve(name, module, h[name].float(), b, 0, "gguf", CFG.gptq).packed
                assert np.array_equal(got.data, want.data)
    plan = make_plan("bits-rank", _profile(model), 6.0, model=model, scheme="gguf", method="gptq", levels="8,4",
                     ranking="hessian", database=str(db.folder))
    quant = plan.bind(model).quant
    assert {q.bits for q in quant.values()} == {4, 8} and {q.scheme for q in quant.values()} == {"gguf"}
    saved = compress(model, plan, format="gguf", out=tmp_path / "ck")  # no calibration text: the database's levels
    reader = gguf.GGUFReader(str(saved.path / saved.record["file"]))
    tensors = {t.name: t for t in reader.tensors}
    hf_names = {t["name"] for t in saved.record["tensors"]}
    for name, q in quant.items():
        i, kind = int(name.split(".")[2]), name.split(".")[-1]
        gguf_name = next(n for n in hf_names if n.startswith(f"blk.{i}.") and n.endswith(_GGUF_SUFFIX[kind]))
        got, want = np.asarray(tensors[gguf_name].data).view(np.uint8), db.packed(name, q.bits).data
        if kind in ("q_proj", "k_proj"):  # llama.cpp's layout interleaves the rotary halves: the same rows, reordered
            got, want = sorted(map(bytes, got)), sorted(map(bytes, want))
        assert np.array_equal(got, want), name
    module = model.module.get_submodule(names[0])
    with pytest.raises(PlanError, match="one width per input group"):
        db.mixed(names[0], module, [4, 8])
    with pytest.raises(PlanError, match="holds GPTQ on the GGUF types, not the group 16 asym"):
        make_plan("bits-rank", _profile(model), 6.0, model=model, group_size=16, method="gptq", levels="8,4",
                  database=str(db.folder))


_GGUF_SUFFIX = {"q_proj": "attn_q.weight", "k_proj": "attn_k.weight", "v_proj": "attn_v.weight",
                "o_proj": "attn_output.weight", "gate_proj": "ffn_gate.weight", "up_proj": "ffn_up.weight",
                "down_proj": "ffn_down.weight"}
