"""lensbench: what every layer of a transformer does, which layers matter, and what removing,
skipping or quantising them costs."""
__version__ = "0.1.0"

import logging as _logging  # noqa: E402

# transformers imports torchao when it is installed (the dev extra has it); torchao then logs, on every
# import, that its CUDA-only extensions do not load on this CPU build, and torch logs enum-registration
# deprecations. Neither says anything about the user's run.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from .errors import LensbenchError  # noqa: E402
from .load import load  # noqa: E402
from .model import Batch, Model  # noqa: E402
from .trace import Trace  # noqa: E402
from .capture import capture  # noqa: E402
from .profile import LayerScores, Profile  # noqa: E402
from .profiling import profile_model  # noqa: E402
from .compress import compress  # noqa: E402


__all__ = ["compress", "Batch", "LayerScores", "LensbenchError", "Model", "Profile", "Trace", "capture", "load",
           "profile_model", "__version__"]
