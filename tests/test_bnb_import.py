"""The repository's ``kernels/`` folder (packaged as ``zoft.kernels``) never answers for Hugging
Face's ``kernels`` package, which bitsandbytes and transformers import when they find it.

Every check runs in a fresh interpreter started with cwd = the repository root and ``python -c``,
so ``sys.path[0]`` is the root and ``kernels/`` is on the path as a top-level folder: the situation
of ``python -m pytest`` or of a script run from the root. ``kernels/__init__.py`` detects that it is
being imported as ``kernels`` and puts the real package (if one is installed further down sys.path)
or an empty namespace package (if not) in ``sys.modules`` in its place; the second test installs a
stand-in "real" package to check the first branch.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(r"""
    import importlib, importlib.util, json, os, sys
    root = os.getcwd()
    assert sys.path[0] in ("", root), sys.path[:2]          # the repo root is the first path entry
    out = {"found_before": getattr(importlib.util.find_spec("kernels"), "origin", None)}

    import bitsandbytes, bitsandbytes.nn                      # noqa: E401 - what --quant imports
    import bitsandbytes.backends.cpu.ops                      # tries `from kernels import get_kernel` on AVX512-BF16 CPUs
    from transformers import BitsAndBytesConfig               # noqa: F401
    import transformers.integrations.bitsandbytes             # the quantization integration
    import transformers.integrations.hub_kernels              # runs transformers' is_kernels_available()
    from transformers.utils import is_kernels_available
    out["is_kernels_available"] = is_kernels_available()
    try:                                                      # bitsandbytes' own probe, verbatim
        from kernels import get_kernel
        out["get_kernel"] = get_kernel()
    except ImportError as e:
        out["get_kernel"] = "ImportError"
        out["get_kernel_error"] = str(e)
    mod = sys.modules.get("kernels")
    out["kernels_file"] = getattr(mod, "__file__", None)
    out["kernels_path"] = [str(p) for p in getattr(mod, "__path__", [])]
    out["kernels_has_zoft_attr"] = hasattr(mod, "HAS_TRITON")
    out["kernels_submodule"] = importlib.util.find_spec("kernels.philox") is not None if mod is not None else None

    try:                                                      # editable / wheel install: package-dir maps it
        import zoft.kernels as zk
        out["zoft_kernels_via"] = "import"
    except ModuleNotFoundError:                               # bare source checkout: map it the same way here
        spec = importlib.util.spec_from_file_location("zoft.kernels", os.path.join(root, "kernels", "__init__.py"),
                                                      submodule_search_locations=[os.path.join(root, "kernels")])
        zk = importlib.util.module_from_spec(spec)
        sys.modules["zoft.kernels"] = zk
        spec.loader.exec_module(zk)
        out["zoft_kernels_via"] = "package-dir mapping"
    from zoft.kernels import codec8
    out["zoft_kernels_file"] = zk.__file__
    out["zoft_kernels_has_triton_attr"] = hasattr(zk, "HAS_TRITON")
    out["codec8_file"] = codec8.__file__
    out["kernels_still_not_ours"] = getattr(sys.modules.get("kernels"), "__file__", None)
    print("RESULT " + json.dumps(out))
""")


def run_child(extra_path: str | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # only the cwd (the repo root) and, optionally, a stand-in install
    if extra_path:
        env["PYTHONPATH"] = extra_path
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # a cold import on a loaded 2-core machine took > 240 s once
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def assert_zoft_kernels_work(res: dict) -> None:
    ours = ROOT / "kernels"
    assert Path(res["zoft_kernels_file"]) == ours / "__init__.py" and res["zoft_kernels_has_triton_attr"]
    assert Path(res["codec8_file"]) == ours / "codec8.py"


def test_without_hf_kernels_the_project_folder_reads_as_not_installed():
    res = run_child()
    # find_spec does see the folder (nothing can stop that with the root on sys.path) ...
    assert res["found_before"] == str(ROOT / "kernels" / "__init__.py")
    # ... but importing it yields an empty namespace package: no file, no zoft code, no submodules
    assert res["kernels_file"] is None and res["kernels_path"] == []
    assert not res["kernels_has_zoft_attr"] and res["kernels_submodule"] is False
    assert res["get_kernel"] == "ImportError"  # bitsandbytes falls back to its own CPU kernels
    # and what it logs says so: not Python's "cannot import name ... (unknown location)", a broken install's look
    assert "Hugging Face's kernels package is not installed" in res["get_kernel_error"]
    assert res["is_kernels_available"] is False  # and transformers does not crash on it
    assert res["kernels_still_not_ours"] is None
    assert_zoft_kernels_work(res)


def test_an_installed_hf_kernels_package_wins_over_the_project_folder(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    # a version below transformers' minimum, so transformers leaves it alone (the stand-in has only get_kernel)
    (fake / "__init__.py").write_text('__version__ = "0.1.0"\n\ndef get_kernel(*args, **kwargs):\n    return "hf"\n')
    res = run_child(str(tmp_path / "site"))
    assert res["get_kernel"] == "hf"  # bitsandbytes gets the installed package, not the repo folder
    assert res["is_kernels_available"] is False  # transformers read its version (too old) from it, not from us
    assert res["kernels_file"] == str(fake / "__init__.py") and not res["kernels_has_zoft_attr"]
    assert_zoft_kernels_work(res)
