"""The house rules of ARCHITECTURE.md as checked contracts.

1. ``stepaudio2.model`` knows no transport or infrastructure client.
2. The service packages and the tokenizer / prompt / parser modules import no torch,
   so the orchestrator and gateway stay small and start fast.
Checked twice: statically (every import statement, at any depth in the file) and at
run time (a fresh interpreter imports the module; torch must not be in sys.modules).
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"
TRANSPORT = {"grpc", "grpc_tools", "grpc_health", "grpc_reflection", "fastapi", "starlette", "uvicorn",
             "redis", "celery", "kombu", "minio", "tritonclient", "kubernetes", "httpx", "requests", "aiohttp"}
TORCH = {"torch", "torchaudio", "transformers", "onnxruntime"}
TORCH_FREE_MODULES = ["stepaudio2.model", "stepaudio2.model.audio", "stepaudio2.model.tokenizer",
                      "stepaudio2.model.prompt", "stepaudio2.model.parser", "stepaudio2.model.tiny_tokenizer",
                      "stepaudio2.runtime.errors", "stepaudio2.runtime.voice_store", "stepaudio2.evaluation",
                      "stepaudio2.runtime.triton_client", "stepaudio2.runtime.triton_params",
                      "stepaudio2.model.token2wav"]
SERVICE_PACKAGES = ["orchestrator", "gateway", "retrieval", "tools", "batch", "runtime"]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def module_file(mod: str) -> Path:
    rel = mod.split(".")[1:]
    p = SERVICES.joinpath(*rel)
    return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")


def test_model_imports_no_transport():
    files = sorted((SERVICES / "model").rglob("*.py"))
    assert files, "services/model has no Python files"
    bad = {str(f.relative_to(SERVICES)): sorted(imported_roots(f) & TRANSPORT) for f in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_service_packages_import_no_torch_statically():
    checked = 0
    for pkg in SERVICE_PACKAGES:
        for f in sorted((SERVICES / pkg).rglob("*.py")) if (SERVICES / pkg).is_dir() else []:
            assert not imported_roots(f) & TORCH, f"{f.relative_to(SERVICES)} imports {imported_roots(f) & TORCH}"
            checked += 1
    for mod in TORCH_FREE_MODULES:
        f = module_file(mod)
        assert f.exists(), f"{mod} has no source file"
        assert not imported_roots(f) & TORCH, f"{mod} imports {imported_roots(f) & TORCH}"
        checked += 1
    assert checked >= len(TORCH_FREE_MODULES)


@pytest.mark.parametrize("mod", TORCH_FREE_MODULES)
def test_torch_free_at_runtime(mod):
    # model modules must load neither torch nor a transport; services may use transports
    banned = TORCH | TRANSPORT if mod.startswith("stepaudio2.model") else TORCH
    code = (f"import sys, {mod}\n"
            f"heavy = sorted(m for m in {sorted(banned)!r} if m in sys.modules)\n"
            "print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing {mod} loaded {r.stdout.strip()}"


def test_errors_table_covers_every_error_class():
    from stepaudio2.runtime import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.StepAudio2Error)]
    assert len(classes) >= 8
    for c in classes:
        m = errors.ERROR_TABLE[c.code]
        assert 400 <= m.http < 600 and m.grpc and m.triton
    assert errors.InvalidAudio("x").mapping.http == 400
    assert errors.UnsupportedAudioFormat("x").mapping.http == 415
    assert str(errors.InvalidArgument("must be > 0", field="top_p")) == "top_p: must be > 0"
