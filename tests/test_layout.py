"""The package's layers: imports only point downward (api -> serving -> photometry -> kernels)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"forcedphot": ROOT / "service", "forcedphot.kernels": ROOT / "kernels"}

# rank of each layer: a module may import its own layer and those of lower rank
LAYERS = {
    "version": 0,
    "defaults": 0,  # names and defaults shared by every layer (no imports of its own)
    "kernels": 0,
    "photometry": 1,
    "demo": 2,
    "serving": 3,
    "api": 4,
    "cli": 5,
    "": 5,  # the package itself (forcedphot/__init__.py: the public Python API)
}


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    found = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> str:
    """The layer a ``forcedphot`` module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(module: str, path: Path) -> list[str]:
    """The forcedphot modules ``module`` imports (absolute and relative)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.append(node.module)
    return [name for name in names if name == "forcedphot" or name.startswith("forcedphot.")]


def test_every_layer_is_known():
    assert {layer_of(m) for m in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module):
    rank = LAYERS[layer_of(module)]
    upward = [name for name in _imports(module, MODULES[module]) if LAYERS[layer_of(name)] > rank]
    assert not upward, f"{module} (layer {layer_of(module) or 'package'}) imports from a higher layer: {upward}"


#: the CPU fast paths (compiled with numba), each held by a test to the array-API kernels
CPU_FAST_PATHS = {"forcedphot.kernels.fused_cpu": {"__future__", "numba", "numpy", "os", "threading", "concurrent", "collections", "math",
                                                   "typing", "forcedphot"},
                  # held by tests/kernels/test_psf_stamps_cpu.py to kernels.psf_stamps
                  "forcedphot.kernels.psf_stamps_cpu": {"numba", "numpy", "math", "forcedphot"}}


def test_kernels_import_only_the_array_api():
    """Kernels are pure array-API functions: no NumPy, no I/O, nothing from the service;
    the CPU fast path may use numba and NumPy, nothing else."""
    allowed_everywhere = {"array_api_compat", "collections", "math", "typing", "forcedphot"}
    for module, path in MODULES.items():
        if layer_of(module) != "kernels":
            continue
        allowed = CPU_FAST_PATHS.get(module, allowed_everywhere)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{module} imports {roots}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule bites: a photometry module importing the API is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from forcedphot.api.problems import Problem\nfrom ..serving import jobs\n")
    names = _imports("forcedphot.photometry.bad", bad)
    assert names == ["forcedphot.api.problems", "forcedphot.serving"]
    assert all(LAYERS[layer_of(n)] > LAYERS["photometry"] for n in names)
