"""Packaging: `pip install hlora` is the library alone; every import is declared where it is needed.

Nothing is installed here: the checks read pyproject.toml, parse the sources, and run hlora (and the
`healthgpt` command with its dependencies hidden) in subprocesses.
"""

import ast
import functools
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
CORE_MODULES = {"torch", "safetensors", "numpy", "triton"}  # one distribution each, of the same name
OPTIONAL_MODULES = {"deepspeed": "deepspeed", "flash_attn": "flash"}  # module -> its extra (not installed here)
INTEGRATIONS = {"hlora/integrations/transformers.py": "transformers"}  # imported by their users only -> the extra


def _name(requirement: str) -> str:
    """A requirement's normalised distribution name (PEP 503), extras and versions dropped."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)).lower()


def _declared(*extras) -> set:
    names = {_name(r) for r in PROJECT["dependencies"]}
    for extra in extras:
        names |= {_name(r) for r in EXTRAS[extra]}
    return names


@functools.cache
def _installed() -> dict:
    """top-level module -> the installed distributions providing it (a second to build: built once)."""
    return importlib.metadata.packages_distributions()


def _distributions_of(module: str) -> set:
    return {_name(d) for d in _installed().get(module, [])}


def _modules_of(distributions: set) -> set:
    return {m for m, dists in _installed().items()
            if {_name(d) for d in dists} & distributions and not m.startswith("_")}


def test_core_is_the_library_alone_and_the_extras_hold_the_rest():
    core = {_name(r): r for r in PROJECT["dependencies"]}
    assert set(core) == CORE_MODULES, f"pip install hlora must pull only {sorted(CORE_MODULES)}, not {sorted(core)}"
    assert "platform_system == 'Linux'" in core["triton"]
    healthgpt = _declared("healthgpt") - set(core)
    assert {"transformers", "accelerate", "diffusers", "pillow", "pydicom", "nibabel", "matplotlib", "pyyaml",
            "scikit-image", "wordllama", "tqdm", "tokenizers"} <= healthgpt
    assert "hlora[healthgpt]" in EXTRAS["dev"] and {"pytest", "peft", "hypothesis"} <= _declared("dev")
    assert _declared("flash") - set(core) == {"flash-attn"} and _declared("deepspeed") - set(core) == {"deepspeed"}
    assert PROJECT["scripts"] == {"healthgpt": "healthgpt.cli:main"}


def _imports(path: pathlib.Path, top_level_only: bool) -> set:
    """Absolute imports of a source file (top-level names): module-level statements only, or all."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = ast.walk(tree) if not top_level_only else _module_level(tree.body)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.partition(".")[0])
    return names


def _module_level(body):
    """Statements that run on import: the module body and the blocks of its if/try statements."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            blocks = [node.body, node.orelse] + ([node.finalbody] + [h.body for h in node.handlers]
                                                 if isinstance(node, ast.Try) else [])
            for block in blocks:
                yield from _module_level(block)


def _third_party(paths, local: set) -> dict:
    found = {}
    for path in paths:
        for name in _imports(path, top_level_only=False) - set(sys.stdlib_module_names) - local:
            found.setdefault(name, path.relative_to(ROOT).as_posix())
    return found


def test_hlora_and_kernels_import_only_the_core_at_module_level():
    bad = {}
    for path in sorted((ROOT / "hlora").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        extra = _imports(path, top_level_only=True) - set(sys.stdlib_module_names) - CORE_MODULES - {"hlora"}
        integration = INTEGRATIONS.get(path.relative_to(ROOT).as_posix())
        if integration:  # its own extra's libraries, and nothing else
            extra -= _modules_of(_declared(integration))
        if extra:
            bad[path.relative_to(ROOT).as_posix()] = sorted(extra)
    assert not bad, f"module-level imports outside torch/safetensors/numpy/triton and the stdlib: {bad}"


def test_every_third_party_import_is_declared_in_the_extra_that_needs_it():
    groups = {  # source folders -> the extras a user of them installs
        ("healthgpt", "examples"): ("healthgpt",),
        ("tests", "benchmarks"): ("healthgpt", "dev"),
    }
    problems = []
    for folders, extras in groups.items():
        paths = [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]
        local = {"hlora", "healthgpt"} | {p.stem for p in paths}  # a test's sibling helper modules
        declared = _declared(*extras)
        for module, where in sorted(_third_party(paths, local).items()):
            if module in OPTIONAL_MODULES:
                ok = _name(module) in {_name(r) for r in EXTRAS[OPTIONAL_MODULES[module]]}
            else:
                dists = _distributions_of(module)
                ok = bool(dists) and bool(dists & declared)
            if not ok:
                problems.append(f"{module} (imported in {where}) is not declared in {' or '.join(extras)}")
    assert not problems, "; ".join(problems)


def test_hlora_trains_a_plain_torch_model_without_importing_any_healthgpt_dependency():
    forbidden = _modules_of(_declared("healthgpt", "dev") - CORE_MODULES - {"hlora"}) | {"healthgpt"}
    assert {"transformers", "diffusers", "PIL", "pydicom", "skimage", "accelerate", "wordllama", "tqdm"} <= forbidden
    script = textwrap.dedent("""
        import json, sys
        import torch
        import torch.nn as nn
        after_torch = set(sys.modules)
        import hlora
        import hlora.integrations

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 5))
        hlora.inject(model, hlora.HLoRAConfig(plugins={"a": hlora.PluginConfig(4, 2, 8), "b": hlora.PluginConfig(6, 3, 6)}))
        hlora.set_task(model, ["a", "b", None])
        params = hlora.trainable_parameters(model)
        before = {n: p.detach().clone() for n, p in params.items()}
        optimizer = torch.optim.SGD(params.values(), lr=0.1)
        loss = (model(torch.randn(3, 7, 12)) - torch.randn(3, 7, 5)).square().mean()
        loss.backward()
        optimizer.step()
        moved = sorted(n for n, p in params.items() if not torch.equal(p, before[n]))
        print(json.dumps({"after_torch": sorted(after_torch), "now": sorted(sys.modules), "moved": moved,
                          "trainable": sorted(params), "loss": loss.item()}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "HLORA_BACKEND"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT / "tests", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # a B starts at zero, so only the B of each adapted layer's routed plugins has a gradient in step 1
    assert result["moved"] == [n for n in result["trainable"] if n.endswith(".B")] and len(result["moved"]) == 4
    assert result["loss"] == result["loss"]  # not NaN
    top = lambda names: {n.partition(".")[0] for n in names}
    loaded = top(result["now"]) - top(result["after_torch"])  # what hlora added to what torch imports itself
    assert "hlora" in loaded
    assert not loaded & forbidden, f"hlora imported {sorted(loaded & forbidden)}"


_HIDE = """
import importlib.abc, re, sys

HIDDEN = {"transformers"}


def _hidden(name):
    return re.sub(r"[-_.]+", "-", name).lower() in HIDDEN


class Hide(importlib.abc.MetaPathFinder):
    \"\"\"Every other finder, minus the hidden modules and distributions: as if never installed.\"\"\"

    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if _hidden(name.partition(".")[0]):
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        return None

    def find_distributions(self, *args, **kwargs):
        for finder in self.finders:
            if hasattr(finder, "find_distributions"):
                for dist in finder.find_distributions(*args, **kwargs):
                    if not _hidden(dist.metadata["Name"]):
                        yield dist


sys.meta_path[:] = [Hide(list(sys.meta_path))]
"""


def test_the_healthgpt_command_without_its_dependencies_says_what_to_install(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(_HIDE)  # runs at interpreter start-up, before the command
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    command = "import sys; from healthgpt.cli import main; sys.exit(main())"  # the console script's body
    out = subprocess.run([sys.executable, "-c", command, "demo", "--out", str(tmp_path / "demo")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        'healthgpt: error: transformers not installed: install hlora[healthgpt] (pip install "hlora[healthgpt]")']
    assert not (tmp_path / "demo").exists()
    check = subprocess.run([sys.executable, "-c", "import transformers"], capture_output=True, text=True, env=env,
                           cwd=tmp_path)
    assert "No module named 'transformers'" in check.stderr, "the hiding did not work: the test would prove nothing"


def test_readme_starts_with_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.partition("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == [
        'pip install torch==2.13.0 && pip install -e ".[healthgpt]" && healthgpt demo --out hlora-demo',
        'pip install torch==2.13.0 setuptools && pip install -e ".[dev]" && DS_BUILD_OPS=0 pip install --no-build-isolation '
        'deepspeed==0.19.8 && pytest',
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0 setuptools" in ci and 'pip install -q -e ".[dev]"' in ci
    assert 'DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation "deepspeed==0.19.8"' in ci
    assert ci.rstrip().splitlines()[-1] == "pytest" and "set -euo pipefail" in ci
