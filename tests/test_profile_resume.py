"""A profile with scans, killed part-way (a real SIGKILL), resumes from its checkpoint to exactly the numbers
of an uninterrupted run; the CLI removes the checkpoint once the profile is saved."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np

from lensbench.profiling import profile_model
from lensbench.testing import SAMPLE_TEXTS, tiny_model

TEXTS = list(SAMPLE_TEXTS) * 2
KW = dict(analyses=["redundancy", "ablation", "quant_sensitivity", "skip_effect"], batch_size=2, seq_len=32,
          progress=False)

CHILD = textwrap.dedent("""
    import sys, time
    from lensbench.analyses.ablation import Ablation
    from lensbench.profiling import profile_model
    from lensbench.testing import SAMPLE_TEXTS, tiny_model

    update, calls = Ablation.update, []
    def slow(self, trace):
        calls.append(1)
        if len(calls) == 4:  # three batches are finished and saved
            print("ready", flush=True)
            time.sleep(60)
        return update(self, trace)
    Ablation.update = slow
    profile_model(tiny_model("llama"), list(SAMPLE_TEXTS) * 2, resume=sys.argv[1], resume_every=0,
                  analyses=["redundancy", "ablation", "quant_sensitivity", "skip_effect"], batch_size=2,
                  seq_len=32, progress=False)
""")


def test_killed_profile_resumes_to_the_same_numbers(tmp_path, capsys):
    ck = tmp_path / "partial.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ck)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ck.is_file()
    model = tiny_model("llama")
    resumed = profile_model(model, TEXTS, resume=ck, resume_every=0, **KW)
    assert "resuming after 3 finished batches" in capsys.readouterr().err
    full = profile_model(model, TEXTS, **KW)
    assert set(resumed.scores) == set(full.scores) and len(full.scores) > 20
    for name, s in full.scores.items():
        np.testing.assert_array_equal(resumed.scores[name].values, s.values, err_msg=name)


def test_a_checkpoint_of_another_run_is_ignored(tmp_path, capsys):
    ck = tmp_path / "partial.safetensors"
    model = tiny_model("llama")
    other = dict(KW, batch_size=3)
    from lensbench import checkpoint
    from lensbench.analyses import make

    analyzers = [make(n) for n in other["analyses"]]
    for a in analyzers:
        a.start(model)
    state = checkpoint.snapshot(analyzers, [checkpoint.derived(a) for a in analyzers])
    checkpoint.save(ck, "another run", 2, 10, state)
    resumed = profile_model(model, TEXTS, resume=ck, resume_every=0, **KW)
    assert "resuming" not in capsys.readouterr().err
    full = profile_model(model, TEXTS, **KW)
    for name, s in full.scores.items():
        np.testing.assert_array_equal(resumed.scores[name].values, s.values, err_msg=name)


def test_cli_profile_leaves_no_checkpoint(tmp_path, tiny_dir):
    from lensbench.cli import main

    (tmp_path / "t.txt").write_text("\n".join(TEXTS))
    assert main(["profile", str(tiny_dir("llama")), "--texts", str(tmp_path / "t.txt"), "--analyses",
                 "redundancy,ablation", "--out", str(tmp_path / "p")]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir() if p.name.startswith(".")) == []
