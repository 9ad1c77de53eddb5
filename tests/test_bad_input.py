"""The bad-input corpus: every case ends with exit status 2 and exactly one line on stderr that names the
problem (the pattern), no traceback, and nothing written where the command would have written.

Cases run the CLI in-process on a tiny random Llama saved as a Hugging Face folder, its profile and a plan
made from it; `{…}` fields are filled from the fixture below."""
import json

import pytest

from lensbench.cli import main

CASES = [  # (argv, pattern in the one line)
    # models and paths
    (["profile", "{tmp}/nope", "--out", "{out}"], "does not exist"),
    (["profile", "{tmp}", "--out", "{out}"], "no config.json"),
    (["profile", "{text}", "--out", "{out}"], "not a .gguf file"),
    (["profile", "{tmp}/fake.gguf", "--out", "{out}"], "not a GGUF file"),
    (["profile", "./a/b/c", "--out", "{out}"], "does not exist"),
    (["summary", "{tmp}/nope"], "does not exist"),
    (["evaluate", "{tmp}/nope", "--plan", "{plan}", "--out", "{out}.json"], "does not exist"),
    # text files
    (["profile", "{model}", "--texts", "{tmp}/missing.txt", "--out", "{out}"], "does not exist"),
    (["profile", "{model}", "--texts", "{empty}", "--out", "{out}"], "is empty"),
    (["profile", "{model}", "--texts", "{binary}", "--out", "{out}"], "not a text file"),
    (["profile", "{model}", "--texts", "{latin}", "--out", "{out}"], "not UTF-8.*--encoding"),
    (["profile", "{model}", "--texts", "{latin}", "--encoding", "no-such-codec", "--out", "{out}"],
     "unknown encoding"),
    (["profile", "{model}", "--encoding", "latin-1", "--out", "{out}"], "--encoding applies to"),
    (["profile", "{model}", "--texts", "{short}", "--out", "{out}"], "two or more tokens"),
    (["capture", "{model}", "--texts", "{binary}", "--out", "{out}"], "not a text file"),
    (["evaluate", "{model}", "--plan", "{plan}", "--texts", "{binary}", "--out", "{out}.json"], "not a text file"),
    # numeric ranges and option kinds
    (["profile", "{model}", "--batch-size", "0", "--out", "{out}"], "--batch-size must be at least 1"),
    (["profile", "{model}", "--seq-len", "0", "--out", "{out}"], "--seq-len must be at least"),
    (["profile", "{model}", "--max-tokens", "0", "--out", "{out}"], "--max-tokens must be at least"),
    (["capture", "{model}", "--texts", "{text}", "--batch-size", "-1", "--out", "{out}"], "at least 1"),
    (["evaluate", "{model}", "--plan", "{plan}", "--n-texts", "0", "--out", "{out}.json"], "--n-texts"),
    (["evaluate", "{model}", "--plan", "{plan}", "--speed-rounds", "0", "--out", "{out}.json"], "--speed-rounds"),
    (["evaluate", "{model}", "--plan", "{plan}", "--decode-tokens", "0", "--out", "{out}.json"], "--decode-tokens"),
    (["app", "{profile}", "--port", "99999"], "--port must be between 1 and 65535"),
    (["app", "{profile}", "--port", "0"], "--port must be between"),
    # output paths of the wrong kind
    (["profile", "{model}", "--out", "{text}"], "is a file; give a directory"),
    (["capture", "{model}", "--texts", "{text}", "--out", "{text}"], "is a file"),
    (["plan", "{profile}", "--policy", "drop-block", "--budget", "1", "--out", "{tmp}"], "is a directory"),
    (["evaluate", "{model}", "--plan", "{plan}", "--out", "{tmp}"], "is a directory"),
    (["report", "{profile}", "--out", "{tmp}"], "is a directory"),
    (["export", "{qplan}", "--format", "torchao", "--out", "{tmp}"], "is a directory"),
    (["profile", "{model}", "--out", "{text}/sub"], "cannot be written"),
    (["plan", "{profile}", "--policy", "drop-block", "--budget", "1", "--out", "{text}/p.json"], "cannot be written"),
    # analyses
    (["profile", "{model}", "--analyses", "redundancy,nope", "--out", "{out}"], "unknown analysis"),
    (["profile", "{model}", "--analyses", "", "--out", "{out}"], "analys"),
    # profiles
    (["summary", "{truncated}"], "not valid JSON"),
    (["summary", "{nan_profile}"], "is NaN, which lensbench never writes"),
    (["summary", "{foreign}"], "not a lensbench profile"),
    (["summary", "{profile}", "--model", "{other}"], "measured on"),
    (["plan", "{truncated}", "--policy", "drop-block", "--budget", "1", "--out", "{out}.json"], "not valid JSON"),
    # plan policies and budgets
    (["plan", "{profile}", "--policy", "nope", "--budget", "1", "--out", "{out}.json"], "unknown policy"),
    (["plan", "{profile}", "--policy", "drop-block", "--budget", "0", "--out", "{out}.json"], "budget"),
    (["plan", "{profile}", "--policy", "drop-block", "--budget", "99", "--out", "{out}.json"], "budget|layers"),
    (["plan", "{profile}", "--policy", "drop-block", "--budget", "1.5", "--out", "{out}.json"], "whole count"),
    (["plan", "{profile}", "--policy", "drop-block", "--budget", "1", "--levels", "4,2", "--out", "{out}.json"],
     "does not take|levels"),
    (["plan", "{profile}", "--policy", "drop-block", "--budget", "1", "--ranking", "nope", "--out", "{out}.json"],
     "unknown ranking"),
    (["plan", "{profile}", "--policy", "bits-rank", "--budget", "9", "--levels", "4,2", "--out", "{out}.json"],
     "cannot be met"),
    (["plan", "{profile}", "--policy", "bits-rank", "--budget", "3", "--levels", "4,7", "--out", "{out}.json"],
     "not a supported bit-width"),
    (["plan", "{profile}", "--policy", "bits-rank", "--budget", "3", "--levels", "4,x", "--out", "{out}.json"],
     "bit-widths separated by commas"),
    (["plan", "{profile}", "--policy", "bits-rank", "--budget", "3", "--group-size", "12", "--out", "{out}.json"],
     "multiple of 8"),
    (["plan", "{profile}", "--policy", "bits-rank", "--budget", "3", "--levels", "4,2", "--scheme", "gguf",
      "--out", "{out}.json"], "input widths|between"),
    (["plan", "{profile}", "--policy", "bits-rank", "--budget", "5", "--levels", "8,7", "--scheme", "gguf",
      "--method", "gptq", "--out", "{out}.json"], "for the gguf scheme"),
    (["plan", "{profile}", "--policy", "balanced-skip", "--budget", "1.5", "--method", "gptq", "--out",
      "{out}.json"], "does not take --method"),
    # plans
    (["evaluate", "{model}", "--plan", "{tmp}/missing.json", "--out", "{out}.json"], "does not exist"),
    (["evaluate", "{model}", "--dense", "{model}", "--method", "gptq", "--out", "{out}.json"], "--method applies"),
    (["evaluate", "{model}", "--plan", "{tmp}/missing.json", "--gptq-texts", "0", "--out", "{out}.json"],
     "--gptq-texts must be at least 1"),
    (["evaluate", "{model}", "--plan", "{tmp}/qplan.json", "--gptq-texts", "4", "--out", "{out}.json"],
     "applies to a plan with GPTQ entries"),
    (["evaluate", "{model}", "--plan", "{truncated}", "--out", "{out}.json"], "not valid JSON"),
    (["evaluate", "{model}", "--plan", "{profile_json}", "--out", "{out}.json"], "not a lensbench plan"),
    (["evaluate", "{model}", "--plan", "{nan_plan}", "--out", "{out}.json"], "is NaN"),
    (["evaluate", "{other}", "--plan", "{plan}", "--out", "{out}.json"], "made for"),
    (["evaluate", "{model}", "--out", "{out}.json"], "give --plan"),
    (["evaluate", "{saved}", "--dense", "{model}", "--plan", "{plan}", "--out", "{out}.json"], "do not go together"),
    (["evaluate", "{text}", "--dense", "{model}", "--out", "{out}.json"], "lensbench-compress.json|not a"),
    # the KV cache
    (["evaluate", "{model}", "--plan", "{kvplan}", "--context", "0", "--out", "{out}.json"], "--context must be"),
    (["evaluate", "{model}", "--plan", "{kvplan}", "--context", "32", "--out", "{out}.json"], "window of 64 tokens"),
    (["evaluate", "{model}", "--plan", "{kvplan}", "--context", "100000", "--out", "{out}.json"], "exceeds"),
    (["evaluate", "{model}", "--plan", "{tmp}/kvbad.json", "--out", "{out}.json"], "k_bits=3 is not supported"),
    (["profile", "{model}", "--analyses", "kv_sensitivity", "--out", "{out}.json"], "names a file"),
    (["plan", "{profile}", "--policy", "kv-tuner", "--budget", "4", "--model", "{model}", "--out", "{out}.json"],
     "needs the kv_sensitivity scores"),
    (["generate", "{model}", "--prompt", "x", "--allow-slow"], "--allow-slow applies to a plan"),
    # compress
    (["compress", "{model}", "--plan", "{plan}", "--format", "hf", "--out", "{saved}"], "--overwrite"),
    (["compress", "{model}", "--plan", "{plan}", "--format", "compressed-tensors", "--out", "{out}"],
     "quantises nothing"),
    (["compress", "{model}", "--plan", "{qplan}", "--format", "compressed-tensors", "--out", "{out}"],
     "--scheme sym"),
    (["compress", "{model}", "--plan", "{qplan}", "--format", "gguf", "--out", "{out}"], "--scheme gguf"),
    (["compress", "{model}", "--plan", "{subplan}", "--format", "gguf", "--out", "{out}"], "attention or MLP"),
    (["compress", "{other}", "--plan", "{plan}", "--format", "hf", "--out", "{out}"], "made for"),
    (["compress", "{model}", "--plan", "{plan}", "--format", "hf", "--out", "{text}"], "is a file"),
    # exports
    (["export", "{plan}", "--format", "torchao", "--model", "{model}"], "quantises nothing"),
    (["export", "{qplan}", "--format", "nope", "--model", "{model}"], "unknown export format"),
    (["export", "{ggufplan}", "--format", "torchao", "--model", "{model}"], "compress --format gguf"),
    # executors
    (["profile", "{model}", "--analyses", "ablation", "--executor", "process", "--workers", "0", "--out", "{out}"],
     "--workers must be 1 or more"),
    (["profile", "{model}", "--analyses", "ablation", "--workers", "2", "--out", "{out}"], "needs --executor"),
    (["profile", "{model}", "--analyses", "ablation", "--ray-address", "127.0.0.1:9", "--out", "{out}"],
     "no Ray cluster answers at 127.0.0.1:9"),
    (["capture", "{model}", "--texts", "{text}", "--executor", "process", "--ray-address", "127.0.0.1:9", "--out",
      "{out}"], "--ray-address is for --executor ray"),
    (["profile", "{model}", "--ray-address", "localhost", "--out", "{out}"], "must look like HOST:PORT"),
    # reports and the app
    (["report", "{tmp}/nope", "--out", "{out}.html"], "does not exist"),
    (["report", "{profile}", "--eval", "{text}", "--out", "{out}.html"], "evaluation record|JSON"),
    (["app", "{tmp}/nope"], "no profile could be opened.*does not exist"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from lensbench.compress.save import compress
    from lensbench.load import load
    from lensbench.compress.plan import KV, Plan
    from lensbench.units import Unit
    from lensbench.profiling import profile_model
    from lensbench.testing import SAMPLE_TEXTS, tiny_model

    tmp = tmp_path_factory.mktemp("bad")
    paths = {"tmp": str(tmp)}
    for arch, key in (("llama", "model"), ("qwen2", "other")):
        m = tiny_model(arch)
        m.module.save_pretrained(tmp / arch)
        m.tokenizer.save_pretrained(tmp / arch)
        paths[key] = str(tmp / arch)
    model = load(paths["model"])
    (tmp / "texts.txt").write_text("\n".join(SAMPLE_TEXTS))
    (tmp / "empty.txt").write_text("\n\n")
    (tmp / "binary.txt").write_bytes(b"\x00\x01\x02binary\xff")
    (tmp / "latin.txt").write_bytes("café au lait\n".encode("latin-1"))
    (tmp / "short.txt").write_text("a\nb\n")
    (tmp / "fake.gguf").write_bytes(b"not a gguf")
    profile = profile_model(model, list(SAMPLE_TEXTS), analyses=["redundancy", "weight_outliers"], seq_len=32,
                            progress=False)
    profile.save(tmp / "prof" / "profile.json")
    text = (tmp / "prof" / "profile.json").read_text()
    (tmp / "truncated.json").write_text(text[: len(text) // 2])
    doc = json.loads(text)
    name = next(n for n, d in doc["scores"].items() if isinstance(d["values"], list))
    doc["scores"][name]["values"][0] = float("nan")
    (tmp / "nan").mkdir()
    (tmp / "nan" / "profile.json").write_text(json.dumps(doc))
    (tmp / "foreign.json").write_text(json.dumps({"hello": 1}))
    card = profile.model
    plan = Plan.drop(card, [Unit(1, "block")])
    plan.save(tmp / "plan.json")
    Plan.quantize(card, {"model.layers.0": (4, 16)}).save(tmp / "qplan.json")
    Plan.quantize(card, {"model.layers.0": (8, 0, "gguf")}).save(tmp / "ggufplan.json")
    Plan.drop(card, [Unit(0, "mlp")]).save(tmp / "subplan.json")
    Plan({"model.layers.0.self_attn": KV(4, 4, window=64)}, card).save(tmp / "kvplan.json")
    kvbad = Plan({"model.layers.0.self_attn": KV(4, 4)}, card).to_dict()
    kvbad["actions"]["model.layers.0.self_attn"]["k_bits"] = 3
    (tmp / "kvbad.json").write_text(json.dumps(kvbad))
    nan_plan = plan.to_dict()
    nan_plan["predicted"] = {"kl": float("nan")}
    (tmp / "nanplan.json").write_text(json.dumps(nan_plan))
    compress(model, plan, format="hf", out=tmp / "saved")
    paths |= {"text": str(tmp / "texts.txt"), "empty": str(tmp / "empty.txt"), "binary": str(tmp / "binary.txt"),
              "latin": str(tmp / "latin.txt"), "short": str(tmp / "short.txt"), "profile": str(tmp / "prof"),
              "profile_json": str(tmp / "prof" / "profile.json"), "truncated": str(tmp / "truncated.json"),
              "nan_profile": str(tmp / "nan"), "foreign": str(tmp / "foreign.json"), "plan": str(tmp / "plan.json"),
              "qplan": str(tmp / "qplan.json"), "ggufplan": str(tmp / "ggufplan.json"),
              "subplan": str(tmp / "subplan.json"), "nan_plan": str(tmp / "nanplan.json"),
              "saved": str(tmp / "saved"), "kvplan": str(tmp / "kvplan.json")}
    return paths


@pytest.mark.parametrize("argv,pattern", CASES, ids=[f"{i:02d}-{c[0][0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_exit_2(world, tmp_path, capsys, argv, pattern):
    import re

    out = tmp_path / "out"
    args = [a.format(out=out, **world) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lensbench: error: ") and "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside the would-be output


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 60 and len({c[0][0] for c in CASES}) >= 9  # commands covered
