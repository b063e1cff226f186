"""benchmarks/host_compat/sitecustomize.py: a transformers that only has the new name of Pixtral's rotary
embedding gets the old one too (what vLLM 0.26 imports), and a sitecustomize it shadows still runs."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_old_pixtral_name_is_added_and_the_shadowed_sitecustomize_runs(tmp_path):
    pkg = tmp_path / "fake" / "transformers" / "models" / "pixtral"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "modeling_pixtral.py").write_text("class PixtralVisionRotaryEmbedding:\n    pass\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sitecustomize.py").write_text("import builtins\nbuiltins.OTHER_SITE = 1\n")
    path = os.pathsep.join([str(REPO / "benchmarks" / "host_compat"), str(tmp_path / "fake"), str(tmp_path / "other")])
    code = ("import builtins\n"
            "from transformers.models.pixtral.modeling_pixtral import PixtralRotaryEmbedding as a, "
            "PixtralVisionRotaryEmbedding as b\n"
            "print(a is b, getattr(builtins, 'OTHER_SITE', 0))")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=path), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "1"]
