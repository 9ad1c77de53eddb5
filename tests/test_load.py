from pathlib import Path

import pytest
import torch

import lensbench
from lensbench import LensbenchError, capture


def test_local_directory_round_trip(tiny, tiny_dir, texts):
    path = tiny_dir("llama")
    m = lensbench.load(str(path))
    assert m.card["source"] == str(path.resolve()) and m.fingerprint() == tiny("llama").fingerprint()
    ref = tiny("llama")
    a, b = capture(m, texts[:2]), capture(ref, texts[:2])
    for k in a.keys():
        torch.testing.assert_close(a[k], b[k])
    read = lensbench.load(str(path), mmap=False)  # the weight file read into memory instead of mapped
    assert read.fingerprint() == m.fingerprint()


def test_module_sources_unwrap_to_the_same_model(tiny, texts):
    from nnsight import NNsight

    ref = tiny("gpt2")
    wrapped = lensbench.load(NNsight(ref.module), tokenizer=ref.tokenizer)
    assert wrapped.module is ref.module and wrapped.fingerprint() == ref.fingerprint()


def test_transformerlens_bridge_is_accepted(tiny_dir, texts):
    from transformer_lens.model_bridge import TransformerBridge

    path = tiny_dir("gpt2")
    bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
    m = lensbench.load(bridge)
    direct = lensbench.load(str(path))
    assert m.fingerprint() == direct.fingerprint()
    a, b = capture(m, texts[:2]), capture(direct, texts[:2])
    torch.testing.assert_close(a["blocks.1.hook_resid_post"], b["blocks.1.hook_resid_post"])


def test_module_without_tokenizer_is_a_clear_error(tiny):
    with pytest.raises(LensbenchError, match="tokenizer="):
        lensbench.load(tiny("llama").module)


@pytest.mark.parametrize("source, message", [
    ("/no/such/model", "does not exist"),
    ("./missing-dir", "does not exist"),
    (42, "cannot load a model from a int"),
])
def test_bad_sources(source, message):
    with pytest.raises(LensbenchError, match=message):
        lensbench.load(source)


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(LensbenchError, match="no config.json"):
        lensbench.load(str(tmp_path))


def test_corrupt_safetensors(tiny_dir):
    path = tiny_dir("llama")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(LensbenchError, match="corrupt or incomplete"):
        lensbench.load(str(path))


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(LensbenchError, match="not a GGUF file"):
        lensbench.load(str(f))


def test_unknown_architecture_directory_fails_before_loading(tmp_path):
    import transformers as T

    cfg = T.OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=50,
                      word_embed_proj_dim=16)
    T.OPTForCausalLM(cfg).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")  # never read: the adapter check comes first
    with pytest.raises(LensbenchError, match=r"no lensbench adapter for OPTForCausalLM.*register"):
        lensbench.load(str(tmp_path))


def test_bbc_splits_are_disjoint_and_complete():
    from lensbench.texts import bbc_news

    cal, held = bbc_news("calibration"), bbc_news("heldout")
    assert not set(cal) & set(held)
    assert len(set(cal)) == len(cal) and len(set(held)) == len(held)
    assert 2000 < len(cal) + len(held) <= 2225 and 0.15 < len(held) / (len(cal) + len(held)) < 0.25
    assert bbc_news("calibration", limit=5) == cal[:5]
    with pytest.raises(LensbenchError, match="unknown split"):
        bbc_news("test")


def test_a_damaged_gguf_cache_is_converted_again(tmp_path, monkeypatch, tiny):
    """A truncated converted copy is detected on load and rebuilt from the GGUF file (the conversion itself is
    replaced by saving a tiny model: converting a real GGUF takes ~40 s)."""
    import sys

    from lensbench.atomic import write_json

    ld = sys.modules["lensbench.load"]  # the module (lensbench.load is also the function's name)

    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    calls = []

    def convert(path, target, sha):
        calls.append(target)
        m = tiny("llama")
        m.module.save_pretrained(target)
        m.tokenizer.save_pretrained(target)
        write_json(target / "lensbench-cache.json", {"gguf": str(path), "sha256": sha})

    monkeypatch.setattr(ld, "_convert_gguf", convert)
    expected = ld.load(gguf).fingerprint()
    (weights,) = calls[0].glob("*.safetensors")
    head = weights.read_bytes()[:100]
    weights.unlink()  # a new file: the loaded model may still map the old one
    weights.write_bytes(head)  # truncated
    again = ld.load(gguf)
    assert len(calls) == 2 and again.fingerprint() == expected


def test_unknown_model_type_names_it(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "foo_bar_arch", "architectures": ["FooBar"]}')
    with pytest.raises(LensbenchError, match=r"has no model type 'foo_bar_arch'; use a transformers release"):
        lensbench.load(tmp_path)


def test_a_chunked_bundled_model_is_joined_once_and_checked(tmp_path, monkeypatch):
    import hashlib

    from lensbench import bundled

    root = Path(bundled.__file__).parent
    chunks = [("lensbench", "bundled.py"), ("lensbench", "errors.py")]
    whole = b"".join((root / rel).read_bytes() for _, rel in chunks)
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path))
    monkeypatch.setitem(bundled.BUNDLED, "fake", ("lensbench", "lensbench", "fake.gguf", "a fake", "none"))
    monkeypatch.setitem(bundled.CHUNKED, "fake", ("0" * 64, chunks))
    with pytest.raises(LensbenchError, match="joined chunks of fake have sha256"):
        bundled.joined("fake")
    assert not (tmp_path / "bundled" / "fake.gguf").exists()  # nothing half-written is left to be trusted
    monkeypatch.setitem(bundled.CHUNKED, "fake", (hashlib.sha256(whole).hexdigest(), chunks))
    path = bundled.joined("fake")
    assert path.read_bytes() == whole and bundled.joined("fake") == path


def test_a_missing_chunked_model_names_the_command_that_installs_it(tmp_path, monkeypatch):
    from lensbench import bundled

    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path))
    monkeypatch.setitem(bundled.BUNDLED, "fake", ("fake-dist", "fake_dist", "fake.gguf", "a fake", "no licence"))
    monkeypatch.setitem(bundled.CHUNKED, "fake", ("0" * 64, [("no_such_chunk_package", "data/x")]))
    with pytest.raises(LensbenchError, match="fake is not installed: ./run gemma"):
        bundled.joined("fake")
