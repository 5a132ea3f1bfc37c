"""``hlora.kernels`` sits below ``hlora``: no module of it imports ``hlora`` (outside ``hlora.kernels``),
and its reference math imports without Triton."""

import ast
import pathlib
import subprocess
import sys

import hlora.kernels

KERNELS_DIR = pathlib.Path(hlora.kernels.__file__).parent


def _imported_modules(path: pathlib.Path):
    """Absolute names of every module ``path`` imports (relative imports resolved inside hlora.kernels)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.module
            else:
                parts = ["hlora", "kernels"][: max(0, 3 - node.level)]  # level 1: hlora.kernels, 2: hlora
                yield ".".join(parts + ([node.module] if node.module else []))


def _run(code: str) -> str:
    """``code`` in a fresh interpreter -> its stdout (its stderr in the failure message)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_kernels_import_nothing_from_hlora():
    files = sorted(KERNELS_DIR.glob("*.py"))
    assert any(f.name == "ops.py" for f in files)
    offending = [
        f"{f.name}: {name}"
        for f in files
        for name in _imported_modules(f)
        if (name == "hlora" or name.startswith("hlora.")) and not name.startswith("hlora.kernels")
    ]
    assert not offending, offending


def test_scan_sees_an_upward_import(tmp_path):
    """The scan above would catch both spellings of an import of hlora."""
    bad = tmp_path / "bad.py"
    bad.write_text("from hlora.functional import hlora_linear\nfrom .. import layer\n")
    assert list(_imported_modules(bad)) == ["hlora.functional", "hlora"]


def test_reference_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any import of triton now raises ImportError
        "from hlora.kernels.reference import GATE_LOG_FLOOR, router_gates\n"
        "import hlora.functional, torch\n"
        "assert hlora.functional.router_gates is router_gates\n"
        "print(GATE_LOG_FLOOR)\n"
    )
    assert _run(code).strip() == "-60.0"


def test_the_folder_seen_as_a_top_level_kernels_is_not_taken_for_the_hub():
    """With the checkout's root on sys.path (``python -c`` / ``python -m pytest`` there), ``kernels/`` is
    importable as a top-level ``kernels``: transformers' probe for Hugging Face's kernel hub must find it
    absent, and importing it must define nothing (its ops are registered once, by ``hlora.kernels``)."""
    code = (
        f"import sys; sys.path.insert(0, {str(KERNELS_DIR.parent)!r})\n"
        "import torch, hlora.kernels\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "import kernels\n"
        "print(is_kernels_available(), kernels is hlora.kernels, hasattr(kernels, 'fused_hlora_linear'),\n"
        "      'kernels.ops' in sys.modules, torch.ops.hlora.fused_fwd.default._schema.name)\n"
    )
    assert _run(code).split() == ["False", "False", "False", "False", "hlora::fused_fwd"]
