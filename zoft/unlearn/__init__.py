"""LLM unlearning: objectives (GA, GradDiff, NPO, SimNPO, RMU), first-order, zeroth-order and
hybrid optimizers, and robustness attacks (bitsandbytes quantization, relearning). See
docs/unlearning.md::

    from zoft.unlearn import unlearn
    res = unlearn(model="opt-125m", forget="forget.txt", retain="retain.txt", objective="npo",
                  optimizer="hybrid", steps=200, lr=1e-5, output_dir="runs/npo-hybrid",
                  attacks=["nf4", "relearn"])
    res.model, res.history, res.stages
"""
from zoft.unlearn.attacks import bnb_config, quantize, relearn
from zoft.unlearn.config import UnlearnConfig
from zoft.unlearn.data import (
    UnlearnData,
    batch_indices,
    load_texts,
    make_batch,
    tokenize_rows,
)
from zoft.unlearn.objectives import (
    GA,
    NPO,
    OBJECTIVES,
    RMU,
    GradDiff,
    SimNPO,
    UnlearnObjective,
    make_objective,
    mlp_out_names,
    row_nll,
)
from zoft.unlearn.optimizers import (
    CompressedFO,
    OptimizerOptions,
    Runner,
    hybrid_phases,
    make_zo_engine,
    parse_optimizer_options,
    quantize_update,
)
from zoft.unlearn.report import (
    format_table,
    lm_evaluator,
    lm_metrics,
    make_evaluator,
    write_report,
)
from zoft.unlearn.run import Unlearner, UnlearnResult, select_trainable, unlearn

__all__ = [
    "GA", "NPO", "OBJECTIVES", "RMU", "CompressedFO", "GradDiff", "OptimizerOptions", "Runner", "SimNPO",
    "UnlearnConfig", "UnlearnData", "UnlearnObjective", "UnlearnResult", "Unlearner", "batch_indices",
    "bnb_config", "format_table", "hybrid_phases", "lm_evaluator", "lm_metrics", "load_texts", "make_batch",
    "make_evaluator", "make_objective", "make_zo_engine", "mlp_out_names", "parse_optimizer_options",
    "quantize", "quantize_update", "relearn", "row_nll", "select_trainable", "tokenize_rows", "unlearn",
    "write_report",
]
