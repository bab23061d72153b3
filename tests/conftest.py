import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*rope.*", category=UserWarning)

import matplotlib  # noqa: E402
import torch  # noqa: E402

matplotlib.use("Agg")  # this process only: notebook kernels started by nbval keep their inline backend

torch.set_num_threads(min(2, torch.get_num_threads()))
