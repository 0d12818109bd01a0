"""Installation facts: the plugin entry point, and that our kernels never shadow `triton_kernels`."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = os.path.realpath(os.path.join(REPO, "triton_kernels"))


def test_entry_point_registered():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert {ep.name: ep.value for ep in eps}.get("blockattn") == "vllm_blockattn:register"


def test_kernels_install_under_their_own_name():
    spec = importlib.util.find_spec("blockattn_kernels")
    assert spec is not None
    assert os.path.realpath(spec.origin).startswith(OURS + os.sep)
    assert not os.path.exists(os.path.join(REPO, "triton_kernels", "__init__.py"))


def _triton_kernels_locations(cwd, code_prefix=""):
    code = code_prefix + (
        "import importlib.util, os\n"
        "s = importlib.util.find_spec('triton_kernels')\n"
        "print(repr([] if s is None else [os.path.realpath(p) for p in (s.submodule_search_locations or [s.origin])]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


def test_triton_kernels_is_not_ours_from_anywhere(tmp_path):
    assert OURS not in _triton_kernels_locations(tmp_path)


def test_plugin_hides_the_source_folder_when_run_from_the_repo_root():
    # `python -c`/`-m` from the repo root puts it on sys.path, where the folder would import as an empty
    # namespace package that vLLM's MoE probe takes for the real `triton_kernels`. register() hides it.
    locations = _triton_kernels_locations(REPO, "import vllm_blockattn; vllm_blockattn.register()\n")
    assert OURS not in locations


def test_every_subpackage_is_installed():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {
        os.path.relpath(root, REPO).replace(os.sep, ".")
        for root, _, files in os.walk(os.path.join(REPO, "vllm_blockattn"))
        if "__init__.py" in files
    }
    assert found <= listed
