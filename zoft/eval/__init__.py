"""Evaluation with the official MUSE, WMDP and MMLU protocols (see docs/eval.md).

Every function takes a Hugging Face causal LM and its tokenizer and returns plain dicts, so it
runs on any model, with or without the zoft engine::

    from zoft.eval import eval_wmdp, eval_muse
    eval_wmdp(model, tok, "data/wmdp", subsets=["bio"])   # {"wmdp_bio": {"acc", "n", ...}, "wmdp": ...}
    eval_muse(model, tok, "data/muse", corpus="news")     # {"verbmem_f": {"value", "ci_lo", ...}, ...}
"""
from zoft.eval.generate import Generation, continuation_logprobs, greedy_generate, model_max_length, token_logprobs
from zoft.eval.mcq import (
    WMDP_SUBJECTS,
    choice_loglikelihoods,
    encode_pair,
    eval_mmlu,
    eval_wmdp,
    evaluate_items,
    format_prompt,
    load_mmlu,
    load_wmdp,
)
from zoft.eval.metrics import (
    AUC_RETRAIN,
    bootstrap_auc_ci,
    bootstrap_ci,
    forget_holdout_auc,
    min_k_score,
    privleak,
    rouge_l_f1,
)
from zoft.eval.muse import (
    check_muse_data,
    eval_knowmem,
    eval_muse,
    eval_privleak,
    eval_verbmem,
    knowmem_prompt,
    min_k_scores,
)

__all__ = [
    "AUC_RETRAIN",
    "WMDP_SUBJECTS",
    "Generation",
    "bootstrap_auc_ci",
    "bootstrap_ci",
    "check_muse_data",
    "choice_loglikelihoods",
    "continuation_logprobs",
    "encode_pair",
    "eval_knowmem",
    "eval_mmlu",
    "eval_muse",
    "eval_privleak",
    "eval_verbmem",
    "eval_wmdp",
    "evaluate_items",
    "forget_holdout_auc",
    "format_prompt",
    "greedy_generate",
    "knowmem_prompt",
    "load_mmlu",
    "load_wmdp",
    "min_k_score",
    "min_k_scores",
    "model_max_length",
    "privleak",
    "rouge_l_f1",
    "token_logprobs",
]
