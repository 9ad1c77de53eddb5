"""Executors: serial, local processes and Ray give the same results; worker and driver faults lose nothing."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lensbench.cli import main
from lensbench.errors import LensbenchError
from lensbench.executor import ExecutorConfig, ItemFailed, land, run_items, ship
from lensbench.jsonio import plain
from lensbench.profiling import profile_model
from lensbench.testing import SAMPLE_TEXTS, LoggedWork, tiny_model

ITEMS = list(range(8))


def ran(log: Path) -> list[tuple[int, int]]:
    """(pid, item) of every run the log recorded."""
    return [tuple(int(x) for x in p.name.split("-")[:2]) for p in log.iterdir()] if log.is_dir() else []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shipped_model_is_the_same_model(tiny, arch):
    model = tiny(arch)
    again = land(ship(model))
    batch = model.tokenize(list(SAMPLE_TEXTS[:2]))
    with torch.no_grad():
        a = model.module(**batch.model_inputs()).logits
        b = again.module(**batch.model_inputs()).logits
    assert torch.equal(a, b)
    assert again.fingerprint() == model.fingerprint()
    params = dict(again.module.named_parameters(remove_duplicate=False))
    if arch == "gpt2":  # tied embedding and head stay one tensor
        assert params["lm_head.weight"] is params["transformer.wte.weight"]
    for p in params.values():  # writable copies: analyses edit weights in place
        assert p.data.numpy().flags.writeable


def test_bfloat16_model_ships():
    model = tiny_model("llama", dtype=torch.bfloat16)
    again = land(ship(model))
    for (n, a), (_, b) in zip(model.module.state_dict().items(), again.module.state_dict().items(), strict=True):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), n


@pytest.mark.parametrize("kind", ["process", "ray"])
def test_profile_scans_equal_the_serial_run(tiny, kind, request):
    if kind == "ray":
        request.getfixturevalue("ray_local")
    model = tiny("llama")
    analyses = ["ablation", "skip_effect", "quant_sensitivity", "redundancy"]
    params = {"skip_effect": {"mode": "future", "n_positions": 2}, "quant_sensitivity": {"bits": (2, 4)}}
    run = dict(analyses=analyses, analysis_params=params, batch_size=2, seq_len=32, progress=False)
    serial = profile_model(model, list(SAMPLE_TEXTS), **run)
    serial_1 = _at_one_thread(lambda: profile_model(model, list(SAMPLE_TEXTS), **run))
    other = profile_model(model, list(SAMPLE_TEXTS), executor=ExecutorConfig(kind, workers=2), **run)
    assert other.data == serial.data
    assert set(other.scores) == set(serial.scores)
    for name, scores in serial.scores.items():
        a, b = np.asarray(scores.values), np.asarray(other.scores[name].values)
        # the same arithmetic at the same thread count: bit for bit
        assert np.array_equal(np.asarray(serial_1.scores[name].values), b, equal_nan=True), name
        # at another thread count only float32 sums split differently over threads can differ
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=0, err_msg=name)


def test_serial_process_and_ray_items_are_equal(tiny, tmp_path, ray_local):
    model = tiny("llama")
    # each item takes 0.5 s, so the slower worker to start still finds items left (a CI run once saw one
    # worker take all 8 instant items before the other was up)
    out = {kind: run_items(LoggedWork(str(tmp_path / kind), pause=0.5), model, ITEMS, ExecutorConfig(kind, workers=2))
           for kind in ("serial", "process", "ray")}
    assert out["serial"] == out["process"] == out["ray"]
    assert ray_local.get_runtime_context().gcs_address.startswith("127.0.0.1:")  # nothing listens beyond this host
    assert [r["item"] for r in out["ray"]] == ITEMS
    for kind in ("process", "ray"):  # two workers shared the items, each item ran once
        runs = ran(tmp_path / kind)
        assert sorted(i for _, i in runs) == ITEMS and len({pid for pid, _ in runs}) == 2


def _kill_a_worker(log: Path, after: int):
    """An on_done callback that SIGKILLs one worker (by the PID its runs logged) once `after` items are done."""
    state = {"done": 0, "killed": None}

    def on_done(*_):
        state["done"] += 1
        if state["done"] == after and state["killed"] is None:
            pid = next(pid for pid, _ in ran(log) if pid != os.getpid())
            os.kill(pid, signal.SIGKILL)
            state["killed"] = pid
    return state, on_done


@pytest.mark.parametrize("kind", ["process", "ray"])
def test_a_killed_worker_s_items_are_retried(tiny, tmp_path, kind, request):
    if kind == "ray":
        request.getfixturevalue("ray_local")
    model = tiny("llama")
    expected = run_items(LoggedWork(str(tmp_path / "serial")), model, ITEMS)
    log = tmp_path / kind
    state, on_done = _kill_a_worker(log, after=2)
    got = run_items(LoggedWork(str(log), pause=0.3), model, ITEMS, ExecutorConfig(kind, workers=2),
                    resume=tmp_path / "items", key="k", on_done=on_done)
    assert state["killed"] is not None
    assert got == expected
    assert len({pid for pid, _ in ran(log)}) >= 3  # the killed worker was replaced


def test_a_killed_driver_resumes_without_doing_an_item_twice(tiny, tmp_path):
    model = tiny("llama")
    expected = run_items(LoggedWork(str(tmp_path / "serial")), model, ITEMS)
    state = {"n": 0}

    def interrupt(*_):
        state["n"] += 1
        if state["n"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_items(LoggedWork(str(tmp_path / "first")), model, ITEMS, ExecutorConfig("process", workers=2),
                  resume=tmp_path / "items", key="k", on_done=interrupt)
    kept = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "items").glob("item-*.json"))
    assert len(kept) >= 3
    again = run_items(LoggedWork(str(tmp_path / "second")), model, ITEMS, ExecutorConfig("process", workers=2),
                      resume=tmp_path / "items", key="k")
    assert again == expected
    assert not set(kept) & {i for _, i in ran(tmp_path / "second")}  # finished items were not run again
    # a folder of another sweep is cleared, never mixed in
    other = run_items(LoggedWork(str(tmp_path / "third")), model, ITEMS[:2], resume=tmp_path / "items", key="k2")
    assert other == expected[:2] and sorted(i for _, i in ran(tmp_path / "third")) == ITEMS[:2]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")  # a zombie
    except (OSError, IndexError):
        return True


def test_process_workers_of_a_killed_driver_exit(tmp_path):
    """A driver killed by SIGKILL leaves no process worker waiting, each with a copy of the model."""
    log = tmp_path / "log"
    script = ("from lensbench.executor import ExecutorConfig, run_items\n"
              "from lensbench.testing import LoggedWork, tiny_model\n"
              f"run_items(LoggedWork({str(log)!r}, pause=30), tiny_model('llama'), list(range(8)), "
              "ExecutorConfig('process', workers=2))\n")
    driver = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while len({pid for pid, _ in ran(log)} if log.exists() else ()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = {pid for pid, _ in ran(log)}
    assert len(workers) == 2
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 30  # the watchdog looks twice a second; slack for a loaded machine
    while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(pid) for pid in workers)


@pytest.mark.parametrize("kind", ["serial", "process", "ray"])
def test_a_raising_item_stops_the_sweep_in_one_line_and_keeps_the_rest(tiny, tmp_path, kind, request):
    if kind == "ray":
        request.getfixturevalue("ray_local")
    with pytest.raises(ItemFailed) as err:
        run_items(LoggedWork(str(tmp_path / "log"), fail_on=5), tiny("llama"), ITEMS, ExecutorConfig(kind, workers=2),
                  resume=tmp_path / "items", key="k")
    assert str(err.value) == "work item 5 failed: ValueError: item 5 was told to fail"
    kept = {int(p.stem.split("-")[1]) for p in (tmp_path / "items").glob("item-*.json")}
    assert 5 not in kept and kept  # what finished is kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_ray_address_is_one_line_within_seconds():
    start = time.monotonic()
    with pytest.raises(LensbenchError, match=r"^no Ray cluster answers at 127\.0\.0\.1:\d+ .*ray start --head"):
        ExecutorConfig("ray", address=f"127.0.0.1:{_free_port()}").check()
    assert time.monotonic() - start < 10


def test_a_running_ray_cluster_by_address(tiny_dir, tmp_path, text_file):
    """A `ray start --head` cluster on 127.0.0.1, joined by address from the profile command in a process of its
    own: the profile equals the serial one. (One node: with Ray's loopback-only switch on, which keeps every
    server on 127.0.0.1, `ray start --address` refuses to add a second node — "Multi-node Ray clusters are not
    supported" — and turning it off binds the cluster to every interface.)"""
    port = _free_port()
    ray_cli = str(Path(sys.executable).parent / "ray")
    # loopback only, so no token authentication (ray start turns it on for a cluster others could reach)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    # --block keeps `ray start` in the foreground as the parent of the node's processes, so ending its process
    # group stops this node and no other Ray on the machine (`ray stop` would stop them all)
    nodes = [subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                               "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    signal.alarm(300)  # a connection that hangs fails this test instead of the whole run
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and nodes[0].poll() is None, "ray start --head did not come up"
                time.sleep(0.5)
        # the command a user runs, in a process of its own (this one has its own local Ray)
        common = [str(tiny_dir("llama")), "--analyses", "ablation", "--texts", str(text_file), "--seq-len", "32",
                  "--max-tokens", "60"]
        done = subprocess.run([sys.executable, "-m", "lensbench", "profile", *common, "--out", str(tmp_path / "ray"),
                               "--ray-address", f"127.0.0.1:{port}", "--workers", "2"],
                              env=env, capture_output=True, text=True, timeout=200)
        assert done.returncode == 0, done.stderr[-2000:]
        # at the thread count each of the cluster's 2 workers on 2 CPUs runs with: bit for bit
        assert _at_one_thread(lambda: main(["profile", *common, "--out", str(tmp_path / "serial")])) == 0
        ray_scores = json.loads((tmp_path / "ray" / "profile.json").read_text())["scores"]
        assert ray_scores == json.loads((tmp_path / "serial" / "profile.json").read_text())["scores"]
    finally:
        signal.alarm(0)
        for node in nodes:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(node.pid, sig)
                    node.wait(timeout=60)
                    break
                except ProcessLookupError:  # the group has already gone
                    break
                except subprocess.TimeoutExpired:
                    continue


def _at_one_thread(fn):
    """fn() with torch on one thread, what each of 2 workers on 2 CPUs gets."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_concept_depth_on_workers_equals_the_serial_run(tiny, tmp_path):
    from lensbench.probes.run import concept_depth_profile
    from lensbench.probes.tasks import load_task
    from lensbench.probes.trainer import ProbeConfig

    model = tiny("llama")
    tasks = [load_task("coinflip", 20), load_task("cities", 20)]
    kw = dict(site="resid", conditions=["clean", "noise", "int8"], cfg=ProbeConfig(seeds=(0,), folds=3), seq_len=128,
              progress=False)
    serial = _at_one_thread(lambda: concept_depth_profile(model, tasks, tmp_path / "serial", **kw))
    ck = tmp_path / "ck"
    other = concept_depth_profile(model, tasks, tmp_path / "workers", checkpoint=ck,
                                  executor=ExecutorConfig("process", workers=2), **kw)
    assert list(other.scores) == list(serial.scores) and len(serial.scores) == 2 * (3 * 4 + 2)
    for name, scores in serial.scores.items():
        assert np.array_equal(scores.values, other.scores[name].values, equal_nan=True), name
        assert plain(scores.params) == other.scores[name].params  # as a saved profile has them (JSON lists)
    assert other.tables["concept_depth"].rows == serial.tables["concept_depth"].rows
    assert len(list((ck / "items").glob("*.json"))) == 6  # one finished item per task and condition


def test_relevance_on_workers_equals_the_serial_run(tiny):
    from lensbench.analyses.lrp.attribute import attribute_all, unit_scores

    model = tiny("llama")
    texts = list(SAMPLE_TEXTS[:3])
    serial = _at_one_thread(lambda: attribute_all(model, texts))
    other = attribute_all(model, texts, executor=ExecutorConfig("process", workers=2))
    for a, b in zip(serial, other, strict=True):
        for key, value in a.to_dict().items():
            assert value == b.to_dict()[key], key
    for a, b in zip(unit_scores(serial), unit_scores(other), strict=True):
        np.testing.assert_allclose(a.values, b.values, rtol=1e-12, err_msg=a.name)


@pytest.mark.parametrize("policy", ["evo", "evo-bits"])
def test_searches_score_each_generation_on_workers_with_the_serial_result(policy):
    """The searches' candidates scored on 2 process workers: the same plan, fitness history and evaluation
    counts as the serial search at the workers' thread count."""
    from lensbench.compress.policies import make_plan

    model = tiny_model("llama", n_layers=6, seed=1)
    analyses = ["redundancy", "ablation"] if policy == "evo" else ["redundancy", "quant_sensitivity"]
    params = {"quant_sensitivity": {"bits": (2, 4, 8), "group_size": 32}}
    prof = profile_model(model, list(SAMPLE_TEXTS), analyses=analyses, analysis_params=params, batch_size=4,
                         seq_len=32, progress=False)
    options = {"generations": 3, "offspring": 3}
    if policy == "evo-bits":
        options.update(group_size=32, levels="2,4,8")
    budget = 2 if policy == "evo" else 4.0
    serial = _at_one_thread(lambda: make_plan(policy, prof, budget, model=model, texts=list(SAMPLE_TEXTS),
                                              **options))
    other = make_plan(policy, prof, budget, model=model, texts=list(SAMPLE_TEXTS),
                      executor=ExecutorConfig("process", workers=2), **options)
    assert other.to_dict() == serial.to_dict()  # actions, predicted fitness, the search's history and counts


def test_a_policy_that_runs_here_refuses_workers(tiny, tmp_path, capsys):
    from lensbench.compress.policies import make_plan
    from lensbench.errors import PlanError

    prof = profile_model(tiny("llama"), list(SAMPLE_TEXTS), analyses=["redundancy"], progress=False)
    with pytest.raises(PlanError, match="runs in this process, not on workers: drop --executor"):
        make_plan("drop-block", prof, 1, ranking="redundancy", executor=ExecutorConfig("process", workers=2))
    prof.save(tmp_path / "prof")
    capsys.readouterr()
    assert main(["plan", str(tmp_path / "prof"), "--policy", "drop-block", "--budget", "1", "--out",
                 str(tmp_path / "plan.json"), "--executor", "process"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the searches evo, evo-bits take it" in err and len(err.splitlines()) == 1, err
