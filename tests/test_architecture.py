"""The layering of docs/ARCHITECTURE.md, checked on the import graph (module-level and function-level
imports alike): gpu/ is a leaf (it may use only the error base class), and the spine imports nothing above
it except the departures listed there, each named here so a new one fails this test."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPINE = {"errors", "atomic", "numeric", "jsonio", "bundled", "adapters", "model", "load", "capture", "trace",
         "store", "replay", "profile", "profiling", "checkpoint", "texts", "stats", "summary", "testing"}
# spine module -> modules above the spine it still imports (docs/ARCHITECTURE.md, "departures")
DEPARTURES = {
    "profiling": {"analyses", "plan"},  # the analyses registry; unit templates for the model card
    "replay": {"apply", "plan"},  # module surgery for replayed removals
    "load": {"compress"},  # reading back the folders lensbench compress writes
}


def internal_imports(path: Path, package: str) -> set[str]:
    """First component below `lensbench` of every lensbench import in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "lensbench" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_gpu_is_a_leaf():
    for path in (ROOT / "gpu").glob("*.py"):
        used = internal_imports(path, "lensbench.gpu") - {"gpu"}
        assert used <= {"errors"}, f"gpu/{path.name} imports lensbench.{sorted(used)}"


def test_the_spine_imports_nothing_above_it_but_the_listed_departures():
    found = {}
    for path in sorted((ROOT / "lensbench").glob("*.py")):
        name = path.stem
        if name not in SPINE:
            continue
        above = internal_imports(path, "lensbench") - SPINE - {"__init__", "gpu", "__version__"}
        assert above <= DEPARTURES.get(name, set()), f"lensbench/{path.name} imports {sorted(above)} from above"
        if above:
            found[name] = above
    assert found == DEPARTURES  # a departure that is gone is taken off the list (and docs/ARCHITECTURE.md)
