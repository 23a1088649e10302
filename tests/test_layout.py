"""
The package's layout and its one import direction, read from the source (ast), not from running it:

    common (small helpers) -> ADM's modules -> methods (guidance) -> run (machinery) -> tables, fetch

(relayout: keep -- this file spells the documented flat names on purpose.)
A module imports only its own layer and those before it; evaluations/ imports only the helpers and ADM; the
import graph has no cycle; imports inside functions are only for optional or heavy dependencies.
"""

import ast
import os

import pytest

from conftest import REPO_ROOT

ADM = {
    "dist_util", "fp16_util", "gaussian_diffusion", "image_datasets", "logger", "losses", "nn", "resample",
    "respace", "script_util", "train_util", "unet",
}
# Modules kept at their documented flat names; each only re-exports its methods/ module.
COMPAT = {"pag", "sag", "inverse"}
LAYERS = {"common": 0, "adm": 1, "methods": 2, "run": 3, "tables": 4, "fetch": 4}
# Imported inside functions, each for a reason given where it is imported.
LAZY_OK = {"PIL", "mpi4py", "sklearn", "fcntl", "tqdm", "matplotlib"}


def _modules():
    """{dotted module name: path} of every module in guided_diffusion/ and evaluations/."""
    found = {}
    for top in ("guided_diffusion", "evaluations"):
        for root, _, files in os.walk(os.path.join(REPO_ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    mod = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
                    found[mod.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(mod, path):
    """[(imported module, inside a function?)] for every import statement of the module."""
    package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    tree = ast.parse(open(path).read())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in inner) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            # `from package import module` imports the module.
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if full in MODULES else base, id(node) in inner))
    return out


def _layer(mod):
    parts = mod.split(".")
    if parts[0] == "evaluations":
        return "evaluations"
    if len(parts) == 1:
        return "common"  # guided_diffusion/__init__.py
    if parts[1] in LAYERS:
        return parts[1]
    if parts[1] in ADM:
        return "adm"
    if parts[1] in COMPAT:
        return "compat"
    raise AssertionError(f"{mod} is neither an ADM module, a compatibility module nor inside a layer's folder")


GRAPH = {mod: [(imp, lazy) for imp, lazy in _imports(mod, path)] for mod, path in MODULES.items()}


def _ours(name):
    return name.split(".")[0] in ("guided_diffusion", "evaluations")


def test_the_package_folder_shows_adm_and_the_layers():
    top = {m.split(".")[1] for m in MODULES if m.startswith("guided_diffusion.")}
    assert top == ADM | COMPAT | (set(LAYERS) - {"adm"})


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_go_one_way(mod):
    layer = _layer(mod)
    for imp, _ in GRAPH[mod]:
        if not _ours(imp):
            continue
        target = _layer(imp)
        if layer == "evaluations":
            assert target in ("common", "adm", "evaluations"), f"{mod} imports {imp} ({target})"
        elif layer == "compat":
            assert target == "methods", f"{mod} imports {imp}"
        else:
            assert target != "compat", f"{mod} imports the compatibility module {imp}; import methods/ instead"
            if target == "evaluations":
                assert LAYERS.get(layer, -1) == 4, f"{mod} ({layer}) imports {imp}: only tables/ and fetch/ may"
            else:
                rank = LAYERS.get(layer, 1)
                assert LAYERS.get(target, 1) <= rank, f"{mod} ({layer}) imports {imp} ({target}), a later layer"
                if rank == 4 and target in ("tables", "fetch"):
                    assert target == layer, f"{mod} imports {imp}: the table runner and the fetcher are separate"


def test_no_import_cycle():
    edges = {m: {i for i, _ in GRAPH[m] if i in MODULES and i != m} for m in MODULES}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycle = path[path.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_inside_functions_are_optional_or_heavy_dependencies_only(mod):
    lazy = sorted(imp for imp, inner in GRAPH[mod] if inner and imp.split(".")[0] not in LAZY_OK)
    assert not lazy, f"{mod} imports {lazy} inside a function"


def test_the_documented_imports_keep_working():
    from guided_diffusion.inverse import create_operator, dps_sample_loop
    from guided_diffusion.methods import inverse, pag, sag
    from guided_diffusion.pag import PAGGuidedModel, perturb_attention
    from guided_diffusion.sag import SAGGuidedModel
    import guided_diffusion.unet  # noqa: F401
    import evaluations.feature_nets  # noqa: F401
    import evaluations.inception  # noqa: F401
    import evaluations.restoration  # noqa: F401

    assert (PAGGuidedModel, perturb_attention) == (pag.PAGGuidedModel, pag.perturb_attention)
    assert SAGGuidedModel is sag.SAGGuidedModel
    assert (create_operator, dps_sample_loop) == (inverse.create_operator, inverse.dps_sample_loop)
