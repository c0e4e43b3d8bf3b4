"""`accel/models`, `accel/eval`'s shapes modules and `tools/refmodel` import alone, with no cycle, and the model
modules never pull in `accel.loading` (loading imports the registry, not the other way round)."""

import subprocess
import sys

import pytest

MODULES = (
    "accel.models",
    "accel.models.components",
    "accel.models.pipelines",
    "accel.models.tiny",
    "accel.models.shapes_flux",
    "accel.models.registry",
    "accel.eval.shapes_captions",
    "accel.eval.shapes_scorer",
    "accel.loading",
    "tools.refmodel.data",
    "tools.refmodel.evaluate",
    "tools.refmodel.train",
)

# One interpreter loads the third-party libraries once (most of the import time), then forks a child per module:
# each child starts with none of the project's modules loaded and imports just one.
FORK_EACH = """
import importlib, os, sys, traceback
import diffusers, scipy.ndimage, transformers
from diffusers import FluxPipeline, StableDiffusion3Pipeline, WanPipeline
from transformers import CLIPTextModelWithProjection, T5EncoderModel, UMT5EncoderModel
assert not any(name.split(".")[0] in ("accel", "tools") for name in sys.modules)
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
            print(module, "ok", "accel.loading" in sys.modules, flush=True)
        except BaseException:
            print(module, "failed", traceback.format_exc().replace(chr(10), " | "), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
"""


@pytest.fixture(scope="module")
def fresh_imports() -> dict[str, list[str]]:
    out = subprocess.run([sys.executable, "-c", FORK_EACH, *MODULES], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return {line.split(" ")[0]: line.split(" ", 2)[1:] for line in out.stdout.splitlines()}


@pytest.mark.parametrize("module", MODULES)
def test_imports_alone(fresh_imports, module):
    status, detail = fresh_imports[module]
    assert status == "ok", detail
    if module.startswith(("accel.models", "accel.eval")):
        assert detail == "False", f"{module} imports accel.loading"
