import functools
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels run on CPU tensors only in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# warnings.filterwarnings("ignore", module="transformers")
torch.set_num_threads(2)

from lensbench.testing import SAMPLE_TEXTS, tiny_model  # noqa: E402


@functools.lru_cache(maxsize=None)
def _tiny(arch, dtype=torch.float32):
    return tiny_model(arch, dtype=dtype)


@pytest.fixture
def tiny():
    """tiny(arch) -> a cached tiny random lensbench Model."""
    return _tiny


@pytest.fixture
def tiny64():
    """tiny64(arch) -> the same tiny random model in float64: for tests that two methods compute the same
    number (a KL of 1e-4 is a difference of O(log vocab) terms: float32 rounding, ~6e-8 of each term, moves it by
    up to ~1e-3 relative, which is why those tests compare in float64 at 1e-6)."""
    return lambda arch: _tiny(arch, torch.float64)


@pytest.fixture
def texts():
    return list(SAMPLE_TEXTS)


@pytest.fixture
def text_file(tmp_path, texts):
    """The sample texts as a text file, one per line."""
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(texts) + "\n")
    return f


@pytest.fixture(scope="session")
def smollm():
    import lensbench

    return lensbench.load("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    import lensbench

    return lensbench.load("minilm-l6")


@pytest.fixture(scope="session")
def bbc_texts():
    from lensbench.texts import bbc_news

    return bbc_news("calibration", limit=8)


@pytest.fixture
def tiny_dir(tmp_path, tiny):
    """A tiny Llama saved as a local Hugging Face directory."""
    def make(arch="llama"):
        m = tiny(arch)
        path = tmp_path / f"tiny-{arch}"
        m.module.save_pretrained(path)
        m.tokenizer.save_pretrained(path)
        return path

    return make


@pytest.fixture(scope="session")
def ray_local():
    """Ray, for the tests that start a local cluster (on 127.0.0.1, by the executor); stopped at the end."""
    ray = pytest.importorskip("ray")
    yield ray
    ray.shutdown()
