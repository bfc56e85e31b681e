import os

import torch

# Kernels run in Triton's CPU interpreter unless a GPU is present; this must happen before triton import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
