"""vLLM plugin: registers PonderForCausalLM so `vllm serve` runs a Ponder Hugging Face export.

Installed as the `vllm.general_plugins` entry point `ponder` (pyproject.toml); vLLM calls
`register()` in every process it starts, so it must stay idempotent and cheap.
"""


def register() -> None:
    from vllm import ModelRegistry

    if "PonderForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("PonderForCausalLM", "exporters.vllm_plugin.model:PonderForCausalLM")
