"""The CLI in-process through main(argv): happy paths and one-line errors for bad input."""
import json

import numpy as np
import pytest

from lensbench.cli import main


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed before the command
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    import re

    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lensbench: error: "), err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


def test_models_lists_bundled_and_architectures(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    for word in ("smollm2-135m", "minilm-l6", "LlamaForCausalLM", "GPTNeoXForCausalLM", "BertModel", "redundancy"):
        assert word in out


def test_profile_writes_json_and_table(capsys, tmp_path, tiny_dir, text_file):
    model_dir = tiny_dir("llama")
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "profile", str(model_dir), "--out", str(out_dir), "--texts", str(text_file),
                         "--max-tokens", "60", "--seq-len", "32")
    assert code == 0, err
    doc = json.loads((out_dir / "profile.json").read_text())
    assert len(doc["scores"]["block_cosine"]["values"]) == 3
    assert 60 <= doc["data"]["n_tokens"] < 60 + 32 and doc["data"]["seq_len"] == 32
    assert (out_dir / "layers.csv").read_text().startswith("layer,block_cosine")
    assert "most redundant" in out
    code, out, _ = run(capsys, "summary", str(out_dir), "--model", str(model_dir))
    assert code == 0 and "least redundant" in out


def test_profile_on_process_workers_in_bfloat16_equals_the_serial_one(capsys, tmp_path, tiny_dir, text_file):
    model_dir = str(tiny_dir("llama"))
    docs = {}
    for name, extra in (("serial", []), ("process", ["--executor", "process", "--workers", "2"])):
        code, out, err = run(capsys, "profile", model_dir, "--out", str(tmp_path / name), "--texts", str(text_file),
                             "--max-tokens", "60", "--seq-len", "32", "--analyses", "ablation,redundancy",
                             "--dtype", "bfloat16", *extra)
        assert code == 0, err
        docs[name] = json.loads((tmp_path / name / "profile.json").read_text())
        assert not list((tmp_path / name).glob(".profile-partial*"))  # the resume state is gone once saved
    assert docs["serial"]["model"]["dtype"] == "bfloat16"
    assert docs["process"]["scores"] == docs["serial"]["scores"]


def test_capture_command_writes_store(capsys, tmp_path, tiny_dir, text_file):
    code, out, err = run(capsys, "capture", str(tiny_dir("gpt2")), "--texts", str(text_file), "--out",
                         str(tmp_path / "store"), "--sites", "hook_resid_post", "--positions", "last")
    assert code == 0, err
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["complete"] is True


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run(capsys, "profile", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "o").exists()


def test_directory_without_config(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    code, _, err = run(capsys, "profile", str(tmp_path / "m"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "no config.json")


def test_corrupt_safetensors(capsys, tmp_path, tiny_dir):
    d = tiny_dir("llama")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "profile", str(d), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "corrupt or incomplete")
    assert not (tmp_path / "o").exists()


def test_corrupt_gguf(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 200)
    code, _, err = run(capsys, "profile", str(f), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "cannot read GGUF file .*corrupt or truncated")
    assert not any((tmp_path / "cache").rglob("*.safetensors"))  # no half-written cache


def test_unknown_architecture(capsys, tmp_path):
    import transformers as T

    cfg = T.OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=50,
                      word_embed_proj_dim=16)
    T.OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    code, _, err = run(capsys, "profile", str(tmp_path / "opt"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, r"no lensbench adapter for OPTForCausalLM.*register")


def test_empty_text_file(capsys, tmp_path, tiny_dir):
    (tmp_path / "empty.txt").write_text("\n  \n")
    code, _, err = run(capsys, "profile", str(tiny_dir()), "--out", str(tmp_path / "o"), "--texts",
                       str(tmp_path / "empty.txt"))
    assert_one_line_error(code, err, "is empty")


def test_sequence_longer_than_context(capsys, tmp_path, tiny_dir, text_file):
    code, _, err = run(capsys, "profile", str(tiny_dir()), "--out", str(tmp_path / "o"), "--texts",
                       str(text_file), "--seq-len", "1000")
    assert_one_line_error(code, err, "longer than .* context of 128 tokens")


def test_truncated_and_foreign_profiles(capsys, tmp_path, tiny_dir, text_file):
    out_dir = tmp_path / "out"
    assert run(capsys, "profile", str(tiny_dir("llama")), "--out", str(out_dir), "--texts", str(text_file))[0] == 0
    good = (out_dir / "profile.json").read_text()

    (out_dir / "profile.json").write_text(good[: len(good) // 2])
    code, _, err = run(capsys, "summary", str(out_dir))
    assert_one_line_error(code, err, "not valid JSON.*truncated")

    doc = json.loads(good)
    doc["schema"] = "lensbench.profile/0"
    (out_dir / "profile.json").write_text(json.dumps(doc))
    code, _, err = run(capsys, "summary", str(out_dir))
    assert_one_line_error(code, err, "schema 'lensbench.profile/0'")

    (out_dir / "profile.json").write_text(good)
    other = tiny_dir("qwen2")
    code, _, err = run(capsys, "summary", str(out_dir), "--model", str(other))
    assert_one_line_error(code, err, "measured on .*not on")
    code, _, err = run(capsys, "profile", str(other), "--out", str(out_dir), "--texts", str(text_file))
    assert_one_line_error(code, err, "measured on .*--overwrite")
    assert (out_dir / "profile.json").read_text() == good  # nothing was replaced


def test_unknown_analysis(capsys, tmp_path, tiny_dir, text_file):
    code, _, err = run(capsys, "profile", str(tiny_dir()), "--out", str(tmp_path / "o"), "--texts",
                       str(text_file), "--analyses", "magic")
    assert_one_line_error(code, err, "unknown analysis 'magic'")


def test_console_script_exit_status(tmp_path):
    """The installed entry point, as a user runs it: one line on stderr, status 2."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lensbench", "profile", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lensbench: error: ")
    assert "Traceback" not in proc.stderr


def test_channels_merges_into_the_same_models_profile(capsys, tmp_path, tiny_dir, text_file):
    from lensbench import Profile
    from lensbench.analyses.channels import ChannelGraph

    model_dir, out_dir = tiny_dir("llama"), tmp_path / "out"
    assert run(capsys, "profile", str(model_dir), "--out", str(out_dir), "--texts", str(text_file))[0] == 0
    code, out, err = run(capsys, "channels", str(model_dir), "--out", str(out_dir), "--z", "1.5")
    assert code == 0, err
    assert "writer components above the null" in out
    profile = Profile.load(out_dir)
    assert profile.data["n_texts"] == 6  # the weight-only run leaves the calibration description alone
    assert {"block_cosine", "composition_q", "composition_k", "composition_v"} <= set(profile.scores)
    assert profile["composition_q"].values.shape == (3, 4, 3, 4)
    graph = ChannelGraph.from_profile(profile)
    assert all(e["z"] > 1.5 for e in graph.edges)
    spectra = profile["ov_singular_values"].values  # each head's W_OV spectrum, descending
    assert spectra.shape[:2] == (3, 4) and (np.diff(spectra, axis=-1) <= 1e-6).all()
    e = graph.edges[0]
    assert np.isclose(spectra[e["writer"][0], e["writer"][1], e["component"]], e["sigma"], rtol=1e-5)
    assert len(graph.plot().data) == 4  # Q, K, V edge traces and the head grid
    code, out, _ = run(capsys, "summary", str(out_dir))
    assert code == 0 and "most redundant" in out and "channels:" in out


def test_channels_with_interventions(capsys, tmp_path, tiny_dir):
    from lensbench import Profile

    code, out, err = run(capsys, "channels", str(tiny_dir("gpt2")), "--out", str(tmp_path), "--z", "1",
                         "--interventions", "2")
    assert code == 0, err
    rows = Profile.load(tmp_path).tables["interventions"].rows
    assert 1 <= len(rows) <= 2 and {"kl_nats", "reader_attention_tv", "random_reader_attention_tv_mean"} <= set(rows[0])
    assert "interventions (project the component out" in out
    assert not (tmp_path / "layers.csv").exists()  # no per-layer scores in a channels-only profile


def test_laundry_command(capsys, tmp_path, tiny_dir):
    from lensbench import Profile

    d = tiny_dir("llama")
    code, _, err = run(capsys, "laundry", str(d), "--out", str(tmp_path), "--n-items", "2,3", "--count", "6", "--edit")
    assert_one_line_error(code, err, "--edit needs the channel graph")
    assert run(capsys, "channels", str(d), "--out", str(tmp_path), "--z", "1")[0] == 0
    code, out, err = run(capsys, "laundry", str(d), "--out", str(tmp_path), "--n-items", "2,3", "--count", "6",
                         "--edit", "--edit-n", "3")
    assert code == 0, err
    p = Profile.load(tmp_path)
    assert [r["n_items"] for r in p.tables["laundry_curve"].rows] == [2, 3]
    assert "heldout_accuracy_edited" in p.tables["laundry_edit"].rows[0] and "channels" in p.tables
    code, _, err = run(capsys, "laundry", str(d), "--out", str(tmp_path), "--n-items", "400")
    assert_one_line_error(code, err, "candidate items are single tokens")


def test_profile_param_option(capsys, tmp_path, tiny_dir, text_file):
    out = tmp_path / "o"
    code, stdout, err = run(capsys, "profile", str(tiny_dir("llama")), "--out", str(out), "--texts", str(text_file),
                            "--analyses", "quant_sensitivity", "--param", "quant_sensitivity.bits=[4,8]",
                            "--param", "quant_sensitivity.group_size=32")
    assert code == 0, err
    names = json.loads((out / "profile.json").read_text())["scores"]
    assert {"quant_kl_block_int4", "quant_kl_block_int8"} <= set(names) and "quant_kl_block_int2" not in names
    code, _, err = run(capsys, "profile", str(tiny_dir("llama")), "--out", str(out), "--texts", str(text_file),
                       "--param", "bits=4")
    assert_one_line_error(code, err, "ANALYSIS.KEY=VALUE")


def test_concept_depth_writes_the_profile_and_clears_its_checkpoint(capsys, tmp_path, tiny_dir):
    from lensbench import Profile

    out = tmp_path / "cd"
    code, text, err = run(capsys, "concept-depth", str(tiny_dir("llama")), "--tasks", "coinflip,cities",
                          "--n-per-class", "20", "--folds", "3", "--seeds", "0", "--seq-len", "128", "--out", str(out))
    assert code == 0, err
    assert "coinflip" in text and "cities" in text and (out / "concept_depth.csv").is_file()
    assert len(Profile.load(out).tables["concept_depth"].rows) == 2
    assert not (out / ".concept-depth-partial").exists()  # only an interrupted run leaves it, to resume from


@pytest.mark.parametrize("argv,pattern", [
    (["profile", "M", "--out", "D", "--batch-size", "0"], r"--batch-size must be at least 1, got 0"),
    (["evaluate", "M", "--plan", "p.json", "--out", "e.json", "--n-texts", "0"], r"--n-texts must be at least 1"),
    (["capture", "M", "--texts", "t.txt", "--out", "S", "--seq-len", "-3"], r"--seq-len must be at least 1"),
    (["concept-depth", "M", "--out", "D", "--folds", "1"], r"--folds must be at least 2"),
    (["app", "D", "--port", "99999"], r"--port must be between 1 and 65535"),
])
def test_numeric_options_are_checked_before_any_work(capsys, argv, pattern):
    code, _, err = run(capsys, *argv)  # "M" is no model: the range is refused before loading one
    assert_one_line_error(code, err, pattern)


def test_out_of_the_wrong_kind_is_refused_before_any_work(capsys, tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    for argv in (["profile", "M", "--out", str(a_file)], ["capture", "M", "--texts", "t", "--out", str(a_file)],
                 ["relevance", "M", "--text", "hi", "--out", str(a_file)]):
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, r"is a file; give a directory")
    for argv in (["evaluate", "M", "--plan", "p.json", "--out", str(tmp_path)], ["report", "P", "--out", str(tmp_path)],
                 ["plan", "P", "--policy", "drop-block", "--budget", "1", "--out", str(tmp_path)]):
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, r"is a directory; give a file name")
    assert a_file.read_text() == "x"


def test_app_port_in_use_is_one_line_and_no_banner(capsys, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code, out, err = run(capsys, "app", str(tmp_path), "--port", str(port))
    assert_one_line_error(code, err, rf"cannot listen on 127.0.0.1:{port}.*another --port")
    assert "lensbench app on" not in out


def test_unknown_analysis_is_refused_before_loading(capsys):
    code, _, err = run(capsys, "profile", "no/such/model", "--out", "x", "--analyses", "redundancy,nope")
    assert_one_line_error(code, err, r"unknown analysis 'nope'")
