"""The public API of `import lensbench as lb`: every name has a docstring with an example, and the examples run
(doctest) on a tiny model, or on the bundled SmolLM2 for `lb.load`; `import lensbench` stays light."""
import doctest
import subprocess
import sys

import pytest

import lensbench as lb
from lensbench.testing import SAMPLE_TEXTS
from lensbench.units import Unit

PUBLIC = ["load", "capture", "profile", "plan", "apply", "evaluate", "Plan", "Profile", "KVCache"]


def examples_of(obj) -> list[doctest.Example]:
    return doctest.DocTestParser().get_examples(obj.__doc__ or "")


def run_examples(obj, globs: dict) -> None:
    test = doctest.DocTestParser().get_doctest(obj.__doc__, globs, obj.__qualname__, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test, out=lambda text: None)
    summary = runner.summarize(verbose=False)
    assert summary.failed == 0, f"{obj.__qualname__}: {summary.failed} of {summary.attempted} examples failed"
    assert summary.attempted > 0


@pytest.mark.parametrize("name", [*PUBLIC, "compress"])
def test_every_public_name_has_a_docstring_with_an_example(name):
    obj = getattr(lb, name)
    if name == "compress":  # the callable package: its example lives on the function it calls
        from lensbench.compress.save import compress as obj
    assert examples_of(obj), f"lensbench.{name} has no example in its docstring"


def test_the_examples_run(tiny, tmp_path):
    from lensbench.compress.save import compress

    model = tiny("llama")
    texts = list(SAMPLE_TEXTS)
    globs = {"lb": lb, "model": model, "texts": texts, "tmp": tmp_path, "Unit": Unit}
    for name in ["capture", "profile", "Profile", "plan"]:
        run_examples(getattr(lb, name), globs)
        globs = {**globs, **_names(getattr(lb, name), globs)}
    globs["plan"] = lb.plan(globs["profile"], "drop-block", 1, ranking="redundancy")
    for obj in (lb.Plan, lb.apply, lb.evaluate, compress, lb.KVCache):
        run_examples(obj, globs)


def _names(obj, globs):
    """The names an example defines (run again to collect them: doctest copies its globals)."""
    ns = dict(globs)
    for ex in examples_of(obj):
        exec(compile(ex.source, "<example>", "single"), ns)
    return {k: v for k, v in ns.items() if k not in globs and not k.startswith("__")}


@pytest.mark.real
def test_the_load_example_runs_on_the_bundled_model():
    run_examples(lb.load, {"lb": lb})


def test_import_lensbench_is_light():
    code = ("import sys, lensbench; heavy = [m for m in sys.modules if m.startswith(('lensbench.compress', "
            "'lensbench.gpu', 'lensbench.app', 'lensbench.cli', 'dash', 'numba'))]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(lb.compress) and lb.profile is lb.profile_model
