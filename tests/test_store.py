import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lensbench import LensbenchError, capture
from lensbench.store import ActivationStore, capture_to_store


def test_store_equals_direct_capture(tmp_path, tiny, texts):
    m = tiny("llama")
    store = capture_to_store(m, texts, tmp_path / "s", batch_size=4, seq_len=32, dtype=torch.float32, progress=False)
    assert store.complete and len(store.manifest["chunks"]) == 2
    direct = capture(m, texts, max_length=32)
    mask = direct.attention_mask.bool()
    for name in direct.keys():
        torch.testing.assert_close(store.load(name), direct[name][mask])
    assert store.n_tokens == int(mask.sum())
    assert store.load("token_ids").tolist() == direct.input_ids[mask].tolist()


def test_positions_last_in_store(tmp_path, tiny, texts):
    m = tiny("gpt2")
    store = capture_to_store(m, texts, tmp_path, positions="last", sites=["hook_resid_post"], progress=False,
                             dtype=torch.float32)
    direct = capture(m, texts, positions="last", sites=["hook_resid_post"])
    torch.testing.assert_close(store.load("blocks.1.hook_resid_post"), direct["blocks.1.hook_resid_post"])


def test_resume_after_interruption(tmp_path, tiny, texts):
    m = tiny("llama")
    calls = []

    def stop_after_first(index):
        calls.append(index)
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture_to_store(m, texts, tmp_path, batch_size=2, progress=False, after_chunk=stop_after_first)
    assert not ActivationStore(tmp_path).complete
    store = capture_to_store(m, texts, tmp_path, batch_size=2, progress=False, after_chunk=calls.append)
    assert calls == [0, 1, 2] and store.complete  # chunk 0 was not captured again
    fresh = capture_to_store(m, texts, tmp_path / "fresh", batch_size=2, progress=False)
    for name in ("blocks.2.hook_mlp_out", "text_index", "position"):
        torch.testing.assert_close(store.load(name), fresh.load(name))


def test_other_settings_refuse_to_mix(tmp_path, tiny, texts):
    m = tiny("llama")
    capture_to_store(m, texts, tmp_path, progress=False)
    with pytest.raises(LensbenchError, match="captured with other settings") as exc:
        capture_to_store(m, texts[:3], tmp_path, progress=False)
    assert "n_texts 6 there, 3 here" in str(exc.value)  # the setting that differs, named
    with pytest.raises(LensbenchError, match="batch_size 8 there, 2 here"):
        capture_to_store(m, texts, tmp_path, batch_size=2, progress=False)


def test_a_chunk_left_half_written_is_removed_and_nan_in_a_manifest_is_named(tmp_path, tiny, texts):
    m = tiny("llama")
    capture_to_store(m, texts, tmp_path, progress=False)
    (tmp_path / ".chunk-000001.safetensors.abc123.tmp").write_bytes(b"\0" * 1000)  # what a kill mid-chunk leaves
    capture_to_store(m, texts, tmp_path, progress=False)  # the same run again: reopened, tidied
    assert not list(tmp_path.glob(".chunk-*.tmp"))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"n_tokens": ', '"n_tokens": NaN, "was": ', 1))
    with pytest.raises(LensbenchError, match=r"chunks\.0\.n_tokens is NaN, which lensbench never writes"):
        ActivationStore(tmp_path)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from lensbench.testing import tiny_model, SAMPLE_TEXTS
    from lensbench.store import capture_to_store
    m = tiny_model("llama")
    slow = lambda i: time.sleep(0.3)
    capture_to_store(m, SAMPLE_TEXTS * 10, sys.argv[1], batch_size=2, progress=False, after_chunk=slow)
""")


def test_resume_after_sigkill(tmp_path, tiny):
    """A real kill -9 mid-run: the store stays readable and a rerun completes it."""
    from lensbench.testing import SAMPLE_TEXTS

    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    root = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, str(script), str(root)], env=dict(os.environ, PYTHONWARNINGS="ignore"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(json.loads((root / "manifest.json").read_text())["chunks"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ActivationStore(root)
    done = len(partial.manifest["chunks"])
    assert 3 <= done < 30 and not partial.complete
    m = tiny("llama")
    redone = []
    store = capture_to_store(m, SAMPLE_TEXTS * 10, root, batch_size=2, progress=False, after_chunk=redone.append)
    assert store.complete and len(store.manifest["chunks"]) == 30
    assert len(redone) == 30 - done
    fresh = capture_to_store(m, SAMPLE_TEXTS * 10, tmp_path / "fresh", batch_size=2, progress=False)
    torch.testing.assert_close(store.load("blocks.0.hook_resid_post"), fresh.load("blocks.0.hook_resid_post"))


@pytest.mark.parametrize("kind", ["process", "ray"])
def test_capture_in_shards_equals_the_serial_store(tmp_path, tiny, texts, kind, request):
    from lensbench.executor import ExecutorConfig
    if kind == "ray":
        request.getfixturevalue("ray_local")
    m = tiny("llama")
    serial = capture_to_store(m, texts * 2, tmp_path / "serial", batch_size=2, seq_len=32, progress=False)
    sharded = capture_to_store(m, texts * 2, tmp_path / kind, batch_size=2, seq_len=32, progress=False,
                               executor=ExecutorConfig(kind, workers=2))
    assert sharded.complete and sharded.manifest == serial.manifest
    for a, b in zip(serial.chunks(), sharded.chunks(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
