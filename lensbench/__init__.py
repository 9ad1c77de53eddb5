"""lensbench: what every layer of a transformer does, which layers matter, and what removing,
skipping or quantising them costs."""
__version__ = "0.1.0"

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
