"""Running a stage on every GPU from a notebook.

Imports: nothing of the package.
"""
from __future__ import annotations

import os
import sys

import torch
from accelerate import notebook_launcher


def launch(fn, *args):
    """Run a stage on every GPU: notebook_launcher inside a notebook when there are several
    (Kaggle's T4 x2), a plain call otherwise (`accelerate launch` starts the processes itself)."""
    n = torch.cuda.device_count()
    if n > 1 and "WORLD_SIZE" not in os.environ and "ipykernel" in sys.modules:
        notebook_launcher(fn, args, num_processes=n)
        return None
    return fn(*args)
