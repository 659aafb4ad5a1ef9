import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

# Tiny models: one thread is faster than two (less synchronisation) and keeps results independent of the core count.
torch.set_num_threads(1)
