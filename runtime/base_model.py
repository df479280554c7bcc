"""Imported base models, materialised once as Ponder checkpoints in a local cache.

An adapted pretrained model ships only what training changed (exit head, exit adapters,
calibration) and names its base in base.json. The base is imported on first use (from a pip
package's GGUF, a local directory or a hub id) into $PONDER_CACHE (default ~/.cache/ponder)
and read from there afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from runtime.kv_fill import KVFill

CACHE = Path(os.environ.get("PONDER_CACHE", Path.home() / ".cache" / "ponder"))


def base_checkpoint(source: str, cache: Path | None = None) -> Path:
    """Directory of the imported Ponder checkpoint of `source`, importing it if not cached."""
    target = cached_path(source, cache)
    if (target / "model.safetensors").is_file():
        return target
    import_checkpoint(source, target)
    return target


def cached_path(source: str, cache: Path | None = None) -> Path:
    """Where the imported checkpoint of `source` lives in the cache."""
    key = Path(source).name.replace(".", "-") + "-" + hashlib.sha256(source.encode()).hexdigest()[:8]
    return (cache or CACHE) / "base" / key


def import_checkpoint(source: str, out: Path, min_depth: int = 0, exit_adapter_rank: int = 0,
                      max_seq_len: int = 2048, kv_fill: KVFill | str = KVFill.PROPAGATE) -> Path:
    """Import `source` as a Ponder checkpoint at `out` (written atomically: a temp dir, then a rename)."""
    from runtime.checkpoint import save_checkpoint
    from runtime.llama_import import fast_tokenizer, import_llama, load_hf, ponder_config

    hf_model, hf_tokenizer = load_hf(source)
    cfg = ponder_config(hf_model.config, min_depth=min_depth, exit_adapter_rank=exit_adapter_rank,
                        max_seq_len=max_seq_len, kv_fill=kv_fill)
    model = import_llama(hf_model, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    tmp.chmod(0o755)
    try:
        save_checkpoint(tmp, model, fast_tokenizer(hf_tokenizer), chat_template=getattr(hf_tokenizer, "chat_template", None))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
