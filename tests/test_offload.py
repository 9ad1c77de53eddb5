"""Layer-by-layer models (`lensbench.offload`): the weights stay in their safetensors files and are read in only
while their module runs; every result equals the model loaded whole, and what cannot run that way is refused."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import lensbench as lb
from lensbench.budget import check_fits, estimate
from lensbench.errors import LensbenchError
from lensbench.executor import ship
from lensbench.offload import is_offloaded, resident
from lensbench.profiling import profile_model
from lensbench.store import capture_to_store
from lensbench.testing import TINY_ARCHS

FORWARD_ONLY = ["redundancy", "ablation", "skip_effect", "geometry", "kv_sensitivity"]


def _on_disk(model) -> bool:
    """Every weight is its stand-in: a stride-0 view of one NaN (nothing of the weights is in memory)."""
    return all(p.dim() == 0 or set(p.stride()) == {0} for p in model.module.parameters())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_outputs_and_fingerprint_equal_the_whole_model(tiny_dir, arch, texts):
    path = tiny_dir(arch)
    whole, lbl = lb.load(path), lb.load(path, layer_by_layer=True)
    assert is_offloaded(lbl.module) and not is_offloaded(whole.module) and _on_disk(lbl)
    batch = whole.tokenize(texts[:3])
    with torch.no_grad():
        a = whole.module(**batch.model_inputs())[0]
        b = lbl.module(**batch.model_inputs())[0]
    assert torch.equal(a, b)
    assert _on_disk(lbl)  # read in for the forward, dropped after it
    assert lbl.fingerprint() == whole.fingerprint()  # so profiles and plans match either way
    assert lbl.card["layer_by_layer"] is True


def test_resident_holds_weights_until_the_last_holder_leaves(tiny_dir):
    lbl = lb.load(tiny_dir("llama"), layer_by_layer=True)
    head = lbl.adapter.lm_head
    with resident(head):
        with resident(head.weight):
            assert torch.isfinite(head.weight).all()
        assert torch.isfinite(head.weight).all()  # the outer holder still holds it
    assert torch.isnan(head.weight).all() and _on_disk(lbl)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_profile_equals_the_whole_model(tiny_dir, arch, texts):
    path = tiny_dir(arch)
    whole, lbl = lb.load(path), lb.load(path, layer_by_layer=True)
    kw = dict(analyses=FORWARD_ONLY, progress=False, batch_size=3, seq_len=24)
    a, b = profile_model(whole, texts, **kw), profile_model(lbl, texts, **kw)
    assert a.scores.keys() == b.scores.keys() and len(a.scores) > 20
    for name, sc in a.scores.items():
        assert np.array_equal(np.asarray(sc.values), np.asarray(b.scores[name].values), equal_nan=True), name
    assert _on_disk(lbl)


def test_capture_store_equals_the_whole_model(tmp_path, tiny_dir, texts):
    path = tiny_dir("qwen2")
    kw = dict(batch_size=4, seq_len=32, dtype=torch.float32, progress=False)
    a = capture_to_store(lb.load(path), texts, tmp_path / "whole", **kw)
    b = capture_to_store(lb.load(path, layer_by_layer=True), texts, tmp_path / "lbl", **kw)
    assert a.config == b.config and a.n_tokens == b.n_tokens
    for name in ("blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "token_ids"):
        assert torch.equal(a.load(name), b.load(name))


def test_gptq_layer_by_layer_equals_the_whole_model(tiny_dir):
    """GPTQ's sequential pass with one block in memory at a time: the same codes, scales and errors."""
    from lensbench.compress.gptq import GPTQConfig, quantize_model
    from lensbench.compress.plan import Plan, Quant
    from lensbench.profiling import model_card
    from lensbench.testing import SAMPLE_TEXTS

    path = tiny_dir("llama")
    runs = {}
    for layer_by_layer in (False, True):
        model = lb.load(path, layer_by_layer=layer_by_layer)
        block = model_card(model)["units"]["block"]
        plan = Plan.quantize(model_card(model), {block.format(i=i): Quant(3, 16, method="gptq")
                                                 for i in range(model.n_layers)})
        runs[layer_by_layer] = quantize_model(model, plan.quant_targets(model), list(SAMPLE_TEXTS),
                                              GPTQConfig(batch_size=4, seq_len=64))
    assert _on_disk(model)  # every block's weights, and its in-place GPTQ edits, dropped after its pass
    whole, lbl = runs[False], runs[True]
    assert set(whole) == set(lbl) and whole
    for name, r in whole.items():
        for part in ("packed", "scales", "mins"):
            assert torch.equal(getattr(r.packed, part), getattr(lbl[name].packed, part)), (name, part)
        assert r.error == lbl[name].error and r.damp == lbl[name].damp


def test_weight_readers_and_workers_are_refused(tiny_dir, texts):
    lbl = lb.load(tiny_dir("llama"), layer_by_layer=True)
    with pytest.raises(LensbenchError, match="quant_sensitivity reads weights outside the forward pass"):
        profile_model(lbl, texts, analyses=["redundancy", "quant_sensitivity"], progress=False)
    with pytest.raises(LensbenchError, match="runs in this process only"):
        ship(lbl)


def test_bad_folders(tmp_path, tiny_dir):
    path = tiny_dir("llama")
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            (no_weights / f.name).write_bytes(f.read_bytes())
    with pytest.raises(LensbenchError, match="no .safetensors files"):
        lb.load(no_weights, layer_by_layer=True)
    weights = next(path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:4])
    with pytest.raises(LensbenchError, match="truncated"):
        lb.load(path, layer_by_layer=True)


def test_a_run_over_the_cap_is_refused_before_reading_weights(tiny_dir):
    lbl = lb.load(tiny_dir("llama"), layer_by_layer=True)
    weights, activations = estimate(lbl, 4, 64)
    check_fits(lbl, 4, 64, weights + activations)  # exactly at the cap: runs
    with pytest.raises(LensbenchError, match=r"needs about .* even layer by layer .* more than the cap") as exc:
        check_fits(lbl, 4, 64, weights + activations - 1)
    assert "\n" not in str(exc.value)


def test_cli_layer_by_layer_and_its_bad_input(tmp_path, tiny_dir, text_file, capsys):
    from lensbench.cli import main

    path = tiny_dir("llama")
    assert main(["profile", str(path), "--texts", str(text_file), "--out", str(tmp_path / "p"), "--layer-by-layer",
                 "--analyses", "redundancy,ablation", "--seq-len", "24", "--memory-cap", "4GiB"]) == 0
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["model"]["layer_by_layer"] is True
    assert main(["capture", str(path), "--texts", str(text_file), "--out", str(tmp_path / "c"),
                 "--layer-by-layer"]) == 0
    bad = [(["--memory-cap", "1GB"], "applies to a --layer-by-layer run"),
           (["--layer-by-layer", "--memory-cap", "lots"], "is not a size"),
           (["--layer-by-layer", "--memory-cap", "1kB"], "more than the cap"),
           (["--layer-by-layer", "--executor", "process"], "drop --executor"),
           (["--layer-by-layer", "--analyses", "channels"], "channels reads weights outside the forward pass")]
    for extra, message in bad:
        capsys.readouterr()
        assert main(["profile", str(path), "--texts", str(text_file), "--out", str(tmp_path / "q"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


MEASURE = textwrap.dedent("""
    import json, resource, sys, threading
    import numpy as np
    import lensbench as lb
    from lensbench.budget import estimate
    from lensbench.profiling import profile_model
    from lensbench.texts import bbc_news, select_texts

    layer_by_layer = sys.argv[1] == "1"
    model = lb.load("smollm2-135m", layer_by_layer=layer_by_layer)
    model.fingerprint()
    texts = select_texts(model, bbc_news("calibration"), 128, 256)
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    def high_water():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # the profile's own peak: the high-water mark if the profile raised it, else the largest RSS sampled during
    # it (a GGUF conversion or import before it can have set a higher mark than anything the profile does)
    base, before, sampled, done = rss(), high_water(), [0], threading.Event()

    def sample():
        while not done.wait(0.005):
            sampled[0] = max(sampled[0], rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    profile = profile_model(model, texts, analyses=["redundancy", "skip_effect"], progress=False, batch_size=2,
                            seq_len=128, analysis_params={"skip_effect": {"mode": "all"}})
    done.set()
    sampler.join()
    after = high_water()
    peak = after if after > before else sampled[0]
    weights, activations = estimate(model, 2, 128)
    print(json.dumps({"base": base, "peak": peak, "before": before, "weights": weights, "activations": activations,
                      "scores": {k: np.asarray(v.values).tolist() for k, v in profile.scores.items()}}))
""")


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_layer_by_layer_stays_under_its_cap(tmp_path):
    """The real model, each way in a process of its own: the layer-by-layer peak RSS over the process after
    loading stays within its estimate (the largest module + activations) + 25%, far below the whole model's,
    with the same profile."""
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    runs = {}
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, str(script), flag], capture_output=True, text=True, timeout=900,
                             env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert out.returncode == 0, out.stderr[-2000:]
        runs[flag] = json.loads(out.stdout.strip().splitlines()[-1])
    whole, lbl = runs["0"], runs["1"]
    assert whole["scores"] == lbl["scores"]
    over = lbl["peak"] - lbl["base"]
    assert over <= 1.25 * (lbl["weights"] + lbl["activations"]), {k: v for k, v in lbl.items() if k != "scores"}
    model_bytes = 134_515_008 * 4
    assert lbl["peak"] < whole["peak"] - 0.5 * model_bytes, (lbl["peak"], whole["peak"])
