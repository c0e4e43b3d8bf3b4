"""Accelerators on compiled blocks: the compiled region is one block's own forward; skip decisions stay in Python."""

import numpy as np
import torch

from accel import accelerate
from accel.loading import load_pipeline
from helpers import run

SPECS = ["fbcache:threshold=0.5", "magcache:mag_ratios=[1.0],threshold=0.3,retention_ratio=0.2"]


def test_accelerated_call_on_compiled_blocks_matches_eager(load):
    eager = load("tiny-flux")
    compiled = load_pipeline("tiny-flux", compile=True)
    for block in compiled.transformer.transformer_blocks:
        assert "compile" in type(block.forward).__name__.lower() or hasattr(block.forward, "_torchdynamo_orig_callable")
    plain_eager, plain_compiled = run(eager, "tiny-flux", num_inference_steps=6), run(compiled, "tiny-flux", num_inference_steps=6)
    np.testing.assert_allclose(plain_compiled, plain_eager, atol=1e-4)
    for spec in SPECS:
        with accelerate(eager, spec) as report_eager:
            out_eager = run(eager, "tiny-flux", num_inference_steps=6)
        with accelerate(compiled, spec) as report_compiled:
            out_compiled = run(compiled, "tiny-flux", num_inference_steps=6)
        assert report_compiled.as_dict()["blocks"] == report_eager.as_dict()["blocks"]
        assert report_eager.block_fraction_computed < 1.0
        np.testing.assert_allclose(out_compiled, out_eager, atol=1e-4)
    # hooks came off and the compiled forwards are still in place
    assert all(getattr(b, "_diffusers_hook", None) is None or not b._diffusers_hook.hooks for b in compiled.transformer.transformer_blocks)
    torch._dynamo.reset()
