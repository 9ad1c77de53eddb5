"""plotly.js's cartesian partial bundle for the app (npm `plotly.js-cartesian-dist-min`, MIT licence):
1.5 MB instead of the 4.8 MB full bundle that dcc.Graph loads, with every trace type the app's pages
draw (`TRACES`). A first visit with an empty cache waits for the browser to compile plotly.js;
benchmarks/app.py times that first paint with either bundle.

`./run` fetches it once into the lensbench cache (`python -m lensbench.app.plotly_bundle`): the
version plotly's Python package bundles, checked against a pinned sha512. It is never committed.
Without it (offline, or a plotly.js version not pinned here) the app uses plotly's full bundle.
"""
from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

from lensbench.atomic import write_bytes
from lensbench.bundled import cache_dir

PACKAGE = "plotly.js-cartesian-dist-min"
FILE = "package/plotly-cartesian.min.js"
PINNED = {"4.1.1": "sha512-o8GrFeusncwBIxbBynRJpY4pkgVB6caM+JLpwrLYbbsO7dZ8FJ+SVN2Fr+L7kiG/Z6w4P5O0Jus/Qr5EefHVeg=="}
TRACES = frozenset({"scatter", "bar", "heatmap"})  # what the app draws; all are in the cartesian bundle
REGISTRY = "https://registry.npmjs.org"


def version() -> str:
    from plotly.offline import get_plotlyjs_version  # heavy: plotly, only for figures

    return get_plotlyjs_version()


def path() -> Path:
    return cache_dir() / "plotly" / f"plotly-cartesian-{version()}.min.js"


def available() -> Path | None:
    """The fetched bundle for the installed plotly's plotly.js version, or None."""
    p = path()
    return p if p.is_file() else None


def fetch(timeout: float = 60.0) -> Path:
    """Download the pinned tarball, check its sha512, keep the one minified file. Raises on failure."""
    v = version()
    if v not in PINNED:
        raise RuntimeError(f"plotly.js {v} has no pinned cartesian bundle (pinned: {', '.join(PINNED)}); "
                           f"the app will use the full bundle")
    url = f"{REGISTRY}/{PACKAGE}/-/{PACKAGE}-{v}.tgz"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != PINNED[v]:
        raise RuntimeError(f"{url} does not match its pinned sha512; not used")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        body = tar.extractfile(FILE).read()
    write_bytes(path(), body)
    return path()


def main() -> int:
    if available():
        return 0
    try:
        print(f"fetched plotly.js's cartesian bundle for the app: {fetch()}", file=sys.stderr)
    except Exception as exc:  # optional: the app falls back to plotly's full bundle
        print(f"note: the app will use plotly's full bundle ({type(exc).__name__}: {exc})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
