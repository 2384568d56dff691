"""The runnable examples in the public docstrings run and print what they claim."""
from __future__ import annotations

import doctest

import pytest

import alm_torchrl.checkpoint
import alm_torchrl.frames
import alm_torchrl.modules
import alm_torchrl.objectives.alm
import alm_torchrl.preemption
import alm_torchrl.transforms

MODULES = [alm_torchrl.objectives.alm, alm_torchrl.modules, alm_torchrl.frames, alm_torchrl.transforms,
           alm_torchrl.checkpoint, alm_torchrl.preemption]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
