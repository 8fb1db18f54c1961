"""vLLM is imported by lkserve/engine/vllm/ and nowhere else in lkserve: an upgrade touches one package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lkserve"
BOUNDARY = ROOT / "engine" / "vllm"


def vllm_imports(path: Path) -> list[str]:
    """`import vllm...` / `from vllm... import` statements anywhere in the file (also inside functions)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [f"{path}:{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == "vllm"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
            out.append(f"{path}:{node.lineno}: from {node.module} import ...")
    return out


def test_only_the_vllm_package_imports_vllm():
    files = [p for p in ROOT.rglob("*.py") if BOUNDARY not in p.parents]
    assert len(files) > 50
    bad = [line for p in files for line in vllm_imports(p)]
    assert not bad, "vLLM imported outside lkserve/engine/vllm/:\n" + "\n".join(bad)


def test_the_check_sees_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef g():\n    from vllm.v1 import x\n    import vllm\nfrom lkserve.engine.vllm import a\n")
    assert [s.split(": ", 1)[1] for s in vllm_imports(f)] == ["from vllm.v1 import ...", "import vllm"]
    assert vllm_imports(BOUNDARY / "frontend.py")  # the package itself does import it
