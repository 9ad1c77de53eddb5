"""Fault injection: each writer runs in a child process that SIGKILLs itself at its k-th rename (every atomic
file write and every folder publish goes through `os.replace`), for k = 1, 2, ... until a run finishes. After
each kill a reader must see the old complete artifact or the new complete one, and a rerun must finish and
leave no temporary behind."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from lensbench.testing import SAMPLE_TEXTS

PRELUDE = textwrap.dedent("""
    import os, signal, sys
    kill_at, calls, real = int(sys.argv[1]), [0], os.replace
    def replace(a, b):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b)
    os.replace = replace
    work = sys.argv[2]
    from lensbench.testing import SAMPLE_TEXTS, tiny_model
""")

WRITERS = {
    "profile": """
        from lensbench.profiling import profile_model
        p = profile_model(tiny_model("llama"), list(SAMPLE_TEXTS)[3:], analyses=["redundancy"], seq_len=32,
                          progress=False)
        p.save(work + "/prof/profile.json")
    """,
    "store": """
        from lensbench.store import capture_to_store
        capture_to_store(tiny_model("llama"), list(SAMPLE_TEXTS), work + "/store", batch_size=2, progress=False)
    """,
    "compress": """
        from lensbench.compress import compress
        from lensbench.compress.plan import Plan
        compress(tiny_model("llama"), Plan.load(work + "/new.json"), format="hf", out=work + "/ck", overwrite=True)
    """,
    "gguf-cache": """
        import lensbench
        lensbench.load(work + "/tiny.gguf")
    """,
}


def run_until_finished(writer: str, work: Path, check) -> int:
    """Kill the writer at each rename in turn, calling `check()` after each kill; returns the kills made."""
    code = PRELUDE + textwrap.dedent(WRITERS[writer]) + "print('finished')\n"
    env = {**os.environ, "LENSBENCH_CACHE": str(work / "cache")}
    for k in range(1, 40):
        proc = subprocess.run([sys.executable, "-c", code, str(k), str(work)], capture_output=True, text=True,
                              env=env, timeout=300)
        if proc.returncode == 0:
            assert "finished" in proc.stdout
            return k - 1
        assert proc.returncode == -9, proc.stderr[-2000:]  # killed where asked, never failed otherwise
        check()
    raise AssertionError("the writer never finished")


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith(".tmp") or ".partial" in p.name or ".old-" in p.name)


def test_profile_save(tmp_path):
    from lensbench.profiles import Profile
    from lensbench.profiling import profile_model
    from lensbench.testing import tiny_model

    old = profile_model(tiny_model("llama"), list(SAMPLE_TEXTS)[:3], analyses=["redundancy"], seq_len=32,
                        progress=False)
    old.save(tmp_path / "prof" / "profile.json")
    new = profile_model(tiny_model("llama"), list(SAMPLE_TEXTS)[3:], analyses=["redundancy"], seq_len=32,
                        progress=False)
    seen = set()

    def check():
        got = Profile.load(tmp_path / "prof" / "profile.json")  # never torn
        for label, p in (("old", old), ("new", new)):
            if all(np.array_equal(got.scores[n].values, s.values, equal_nan=True) for n, s in p.scores.items()):
                seen.add(label)
                return
        raise AssertionError("the profile on disk is neither the old one nor the new one")

    kills = run_until_finished("profile", tmp_path, check)
    check()
    assert kills >= 2 and "old" in seen  # killed before and after the sidecar, the JSON
    assert leftovers(tmp_path) == [] and len(list((tmp_path / "prof").glob("*.safetensors"))) == 1


def test_store_capture(tmp_path):
    from lensbench.store import ActivationStore

    def check():
        if not (tmp_path / "store" / "manifest.json").exists():
            return
        store = ActivationStore(tmp_path / "store")
        for chunk in store.chunks():  # every chunk the manifest lists is whole
            assert chunk["token_ids"].numel() > 0

    kills = run_until_finished("store", tmp_path, check)
    store = ActivationStore(tmp_path / "store")
    assert kills >= 4 and store.complete and len(store.manifest["chunks"]) == 3
    assert leftovers(tmp_path) == []


def test_compress_publish(tmp_path):
    import json

    from lensbench.compress.save import compress
    from lensbench.compress.plan import Plan
    from lensbench.units import Unit
    from lensbench.profiling import model_card
    from lensbench.testing import tiny_model

    model = tiny_model("llama")
    compress(model, Plan.drop(model_card(model), [Unit(1, "block")]), format="hf", out=tmp_path / "ck")
    Plan.drop(model_card(model), [Unit(2, "block")]).save(tmp_path / "new.json")

    def kept() -> list[int]:
        return json.loads((tmp_path / "ck" / "lensbench-compress.json").read_text())["layers_kept"]

    def check():
        if (tmp_path / "ck").exists():
            assert kept() in ([0, 2], [0, 1])  # old or new, whole
        else:  # killed between the two renames: the old checkpoint waits beside it, whole
            (old,) = tmp_path.glob(".ck.old-*")
            assert json.loads((old / "lensbench-compress.json").read_text())["layers_kept"] == [0, 2]

    kills = run_until_finished("compress", tmp_path, check)
    assert kills >= 3 and kept() == [0, 1] and leftovers(tmp_path) == []


def test_gguf_cache_conversion(tmp_path, monkeypatch):
    import lensbench
    from lensbench.compress.save import compress
    from lensbench.compress.plan import Plan
    from lensbench.profiling import model_card
    from lensbench.testing import tiny_model

    model = tiny_model("llama")
    saved = compress(model, Plan({}, model_card(model)), format="gguf", out=tmp_path / "g")
    (saved.path / saved.record["file"]).rename(tmp_path / "tiny.gguf")
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    ids = model.tokenize(["The band released their third album."]).input_ids

    def check():
        """Load from a copy of the cache as the kill left it (a damaged or missing copy is converted again);
        the copy keeps this reader from repairing the state the next kill point starts from."""
        import shutil

        copy = tmp_path / f"cache-copy-{len(list(tmp_path.glob('cache-copy-*')))}"
        if (tmp_path / "cache").exists():
            shutil.copytree(tmp_path / "cache", copy)
        monkeypatch.setenv("LENSBENCH_CACHE", str(copy))
        got = lensbench.load(tmp_path / "tiny.gguf")
        np.testing.assert_allclose(got.module(ids).logits.detach().numpy(), model.module(ids).logits.detach().numpy(),
                                   atol=1e-4)
        assert leftovers(copy) == []  # the reader's conversion left no staging behind

    kills = run_until_finished("gguf-cache", tmp_path, check)
    assert kills >= 1
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    np.testing.assert_allclose(lensbench.load(tmp_path / "tiny.gguf").module(ids).logits.detach().numpy(),
                               model.module(ids).logits.detach().numpy(), atol=1e-4)
    assert leftovers(tmp_path / "cache") == []
