"""Checkers for the exercise notebooks (notebooks/exercises/): build OLMo 3 and FlexOlmo yourself.

    from olmo_lab import exercises
    exercises.check_rms_norm(rms_norm)       # ✓ correct, ✗ the known mistake it matches, or where it diverges

Each checker runs the student's function or module and the library's on the same random inputs and
on the shipped lab weights, and returns a `Verdict` (shown as one line): correct; or the known
mistake whose outputs the student's reproduce on every case (QK-norm per head, YaRN on sliding
layers, a window off by one, softmax after top-k, ...); or the first place where the outputs diverge
and by how much. Code that still raises NotImplementedError (a blank) gets "not done yet".
"""

from .attention import check_attention
from .block import check_block
from .cache import check_cache_mask, check_kv_cache
from .causal import check_ablation, check_copy_loss, check_head_effects, copy_task
from .forward import check_model
from .grading import Verdict
from .norm import check_rms_norm
from .rope import check_apply_rope, check_rope_tables
from .routing import check_moe, check_route
from .weights import lab_config, load_lab_weights

__all__ = ["Verdict", "check_rms_norm", "check_apply_rope", "check_rope_tables", "check_attention", "check_block",
           "check_model", "check_kv_cache", "check_cache_mask", "check_route", "check_moe", "lab_config",
           "check_copy_loss", "check_ablation", "check_head_effects", "copy_task", "load_lab_weights"]
