"""One-way layering: bottom (csr_core) → runtimes (csr_runtime, mlx_backend) → neuraldict → csr_eval.

Every import statement of every module, function-level ones included, is read from the source (AST), so a
lazy import from a higher layer fails here as surely as a top-level one."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"csr_core": 0, "csr_runtime": 1, "mlx_backend": 1, "neuraldict": 2, "csr_eval": 3}
SIBLINGS_APART = {("csr_runtime", "mlx_backend"), ("mlx_backend", "csr_runtime")}  # the runtimes never import each other


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(LAYER))
def test_no_module_imports_from_a_higher_layer(package):
    wrong = []
    for path in sorted((ROOT / package).glob("*.py")):
        for other in imported_packages(path) & set(LAYER):
            if LAYER[other] > LAYER[package] or (package, other) in SIBLINGS_APART:
                wrong.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_bottom_and_mlx_runtime_import_no_torch_at_module_level():
    """The dictionary file, code layout and allocation are torch-free (mlx_backend reads them)."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import csr_core.dictionary_file, csr_core.code_layout, csr_core.allocation, csr_core.defaults, "
            "csr_core.corpus, csr_core.paths\nprint('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_torch_runtime_works_without_training_or_baseline_packages():
    """A user who only wants the cache needs neither Lightning nor scikit-learn, jsonargparse or quanto."""
    hidden = ["lightning", "pytorch_lightning", "lightning_fabric", "sklearn", "jsonargparse", "optimum", "matplotlib",
              "neuraldict", "csr_eval"]
    code = ("import sys\n"
            f"for name in {hidden!r}: sys.modules[name] = None\n"
            "import torch\n"
            "from csr_runtime.cache import CSRCache\n"
            "from tests.conftest import tiny_llama\n"
            "from tests.test_cache import random_dictionary\n"
            "lm = tiny_llama(n_layers=2)\n"
            "cache = CSRCache(lm, random_dictionary(lm), sparsity_keys=2, sparsity_values=1)\n"
            "out = lm.generate(torch.randint(1, 128, (1, 12)), max_new_tokens=4, do_sample=False, pad_token_id=0, "
            "past_key_values=cache)\n"
            "assert out.shape == (1, 16) and cache.memory_bytes() > 0\n"
            "print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
