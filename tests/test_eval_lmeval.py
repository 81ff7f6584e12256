"""Cross-check against the standard harness: lm-eval's own WMDP / MMLU task definitions (its
YAML files, included as they ship), run through ``HFLM`` on the same tiny model and fixture
data, give the same per-choice log-likelihoods and accuracy as zoft."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import model_fixture, one_torch_thread, tok_fixture  # noqa: F401

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'lm-eval==0.4.13')")

from zoft.eval.mcq import choice_loglikelihoods, eval_mmlu, eval_wmdp, load_mmlu, load_wmdp

FIX = Path(__file__).parent / "fixtures"


def _task_yaml(name: str, include: Path, data: Path, cache: Path, with_dev: bool) -> str:
    files = {"test": str(data), **({"dev": str(data)} if with_dev else {})}
    return json.dumps({  # JSON is YAML
        "task": name, "include": str(include), "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": files, "cache_dir": str(cache)},
    })


def test_wmdp_and_mmlu_match_lm_eval(model, tok, tmp_path):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    wmdp = load_wmdp(FIX / "wmdp")
    mmlu = load_mmlu(FIX / "mmlu")
    items = {f"zoft_wmdp_{s}": v for s, v in wmdp.items()} | {f"zoft_mmlu_{s}": v for s, v in mmlu.items()}
    for name, its in items.items():
        data = tmp_path / f"{name}.json"
        data.write_text(json.dumps(its))
        if name.startswith("zoft_wmdp_"):
            inc = lm_tasks / "wmdp" / f"wmdp_{name.removeprefix('zoft_wmdp_')}.yaml"
        else:
            inc = lm_tasks / "mmlu" / "default" / f"mmlu_{name.removeprefix('zoft_mmlu_')}.yaml"
        (tasks_dir / f"{name}.yaml").write_text(
            _task_yaml(name, inc, data, tmp_path / "hf_cache", with_dev=name.startswith("zoft_mmlu_")))

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=sorted(items), num_fewshot=0, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))

    ours = eval_wmdp(model, tok, FIX / "wmdp") | eval_mmlu(model, tok, FIX / "mmlu")
    subjects = {"zoft_wmdp_bio": "biology", "zoft_wmdp_cyber": "cybersecurity",
                "zoft_wmdp_chem": "chemistry", "zoft_mmlu_anatomy": "anatomy",
                "zoft_mmlu_abstract_algebra": "abstract algebra"}
    for name, its in items.items():
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        theirs = np.array([[r[0] for r in s["filtered_resps"]] for s in samples])  # (N, 4)
        mine = choice_loglikelihoods(model, tok, its, subjects[name])
        np.testing.assert_allclose(mine, theirs, atol=1e-4)
        key = name.removeprefix("zoft_")
        assert ours[key]["acc"] == pytest.approx(out["results"][name]["acc,none"])
        assert ours[key]["n"] == len(samples)
