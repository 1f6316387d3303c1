"""The README's Python examples run as written (on this machine's device: they pick CUDA when there is one),
each block in a fresh namespace, so an example cannot lean on names another one defined. A block that
imports neuraloperator is skipped where it does not import (not installed, or installed without a dependency
of its own: the neuraloperator tests of test_spectral_conv.py skip alike)."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 7


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i):
    code = BLOCKS[i]
    for module in re.findall(r"^\s*(?:from|import) (neuralop[\w.]*)", code, re.M):
        pytest.importorskip(module)
    torch.manual_seed(0)
    exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": f"readme_block_{i}"})
