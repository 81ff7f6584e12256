"""Smoke test of ``bench/step_cpu.py --quick``: it runs, agrees with the reference on the loss,
and reports the ratio (the timings themselves are not asserted: they depend on the machine)."""
import importlib.util
import json
import math
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name="step_cpu"):
    """``bench/{name}.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_cpu_quick(tmp_path, capsys):
    out = tmp_path / "step_cpu.json"
    threads = torch.get_num_threads()
    # In-process (the imports are shared with the other tests); the reference re-seeds the global
    # generator, as MeZO does, so fork it. One thread: on a shared 2-core machine two OpenMP
    # threads of a toy model mostly wait on each other.
    with torch.random.fork_rng(devices=[]):
        try:
            rc = load_bench().main(["--quick", "--threads", "1", "--json", str(out)])
        finally:
            torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "ratio zoft/reference = " in stdout
    res = json.loads(out.read_text())
    for name in ("reference", "mezo_inplace", "zoft", "zoft[unit]", "forward_only"):
        assert len(res["times_s"][name]) == 2 and res["median_s"][name] > 0
    assert math.isfinite(res["ratio_zoft_over_reference"]) and res["ratio_zoft_over_reference"] > 0
    assert res["loss0"]["rel_diff"] <= 1e-5
    assert math.isfinite(res["ratio_param_over_unit"]) and res["ratio_param_over_unit"] > 0
    assert res["z_per_step"]["mezo_inplace"] == 4.0  # the in-place loop draws z as often as MeZO's
    # The published loop draws z four times per step; zoft once per probe seed and update term,
    # plus once more for a tied embedding in each unit that uses it (the tiny OPT ties lm_head).
    assert res["z_per_step"]["reference"] == 4.0
    assert 2.0 <= res["z_per_step"]["zoft"] < 4.0
