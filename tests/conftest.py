import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*rope.*", category=UserWarning)

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
