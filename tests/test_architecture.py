"""The layering of docs/ARCHITECTURE.md, checked on the import graph (module-level and function-level imports
alike):

    gpu/          a leaf: imports nothing from lensbench but the error base class
    spine         lensbench/*.py and lensbench/adapters/: imports only the spine and gpu/
    analyses      analyses/ and probes/: the spine, gpu/ and each other
    decisions     lensbench/compress/: the layers below
    faces         lensbench/cli/ and app/: anything

and no module imports in a circle (a package importing its own submodules to register them is not a circle:
`from . import x` in an `__init__` whose submodules import only their siblings is allowed, as registration).
Function-level imports are only for heavy or optional dependencies, each with a comment saying which.
"""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"lensbench": "lensbench", "analyses": "lensbench.analyses", "probes": "lensbench.probes",
           "gpu": "lensbench.gpu", "app": "lensbench.app"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = modules()


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "lensbench" or len(parts) < 2:
        return "facade"
    top = parts[1]
    if top == "gpu":
        return "gpu"
    if top in ("analyses", "probes"):
        return "analyses"
    if top == "compress":
        return "decisions"
    if top in ("cli", "app", "__main__"):
        return "faces"
    return "spine"


ALLOWED = {"gpu": {"gpu"}, "spine": {"gpu", "spine"}, "analyses": {"gpu", "spine", "analyses"},
           "decisions": {"gpu", "spine", "analyses", "decisions"},
           "faces": {"gpu", "spine", "analyses", "decisions", "faces", "facade"},
           "facade": {"gpu", "spine", "analyses", "decisions", "faces", "facade"}}


def imports(module: str) -> list[tuple[str, ast.AST, bool]]:
    """(imported lensbench module, node, at module level) for every lensbench import in `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            found = [n for n in names if n in MODULES] or ([target] if target in MODULES else [])
        elif isinstance(node, ast.Import):
            found = [a.name for a in node.names if a.name in MODULES]
        else:
            continue
        out += [(f, node, id(node) in top) for f in found]
    return out


def test_gpu_is_a_leaf():
    for module in (m for m in MODULES if layer(m) == "gpu"):
        used = {t for t, _, _ in imports(module) if layer(t) != "gpu"}
        assert used <= {"lensbench.errors"}, f"{module} imports {sorted(used)}"


def test_every_layer_imports_only_the_layers_below_it():
    for module in MODULES:
        for target, node, _ in imports(module):
            if target == "lensbench.errors" or target == "lensbench.version":
                continue
            assert layer(target) in ALLOWED[layer(module)], \
                f"{module} ({layer(module)}) imports {target} ({layer(target)}) at line {node.lineno}"


def test_no_import_circles():
    graph = {m: set() for m in MODULES}
    for module in MODULES:
        path = MODULES[module]
        for target, _, _ in imports(module):
            # a package's __init__ importing its own submodules registers them; that edge is not a dependency
            if path.name == "__init__.py" and target.startswith(module + "."):
                continue
            if target != module:
                graph[module].add(target)
    seen, stack, on_stack = set(), [], set()

    def visit(m):
        seen.add(m)
        stack.append(m)
        on_stack.add(m)
        for t in graph[m]:
            assert t not in on_stack, "import circle: " + " -> ".join(stack[stack.index(t):] + [t])
            if t not in seen:
                visit(t)
        stack.pop()
        on_stack.discard(m)

    for m in sorted(graph):
        if m not in seen:
            visit(m)


def test_function_level_imports_say_why():
    """Imports inside functions are for heavy or optional dependencies only, and say so in a comment."""
    bad = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                group = lines[node.lineno - 1: node.end_lineno]
                before = lines[node.lineno - 2] if node.lineno > 1 else ""
                if not any(re.search(r"#\s*(heavy|optional)", line) for line in [*group, before]):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {group[0].strip()}")
    assert not bad, "function-level imports without a '# heavy: ...' or '# optional: ...' comment:\n" + "\n".join(bad)


def test_no_private_names_taken_across_modules():
    bad = []
    for module in MODULES:
        for target, node, _ in imports(module):
            if isinstance(node, ast.ImportFrom) and target != module:
                bad += [f"{module} takes {a.name} from {target}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "\n".join(bad)


def test_comments_cite_no_file_outside_the_repository():
    for path in MODULES.values():
        assert "METHODS.md" not in path.read_text(), f"{path.relative_to(ROOT)} cites METHODS.md; cite the paper"
