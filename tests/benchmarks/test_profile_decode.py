"""The decode profile runs on the embedded model: ceilings, per-step figures for each kernel
variant, their ratio, and the JSON."""

import json

from benchmarks.profile_decode import main
from runtime.checkpoint import DEFAULT_MODEL


def test_profile_writes_ceilings_steps_and_kernel_ratios(tmp_path):
    out = tmp_path / "profile.json"
    result = main(["--model", str(DEFAULT_MODEL), "--batches", "1,3", "--context", "8", "--steps", "2",
                   "--profile-steps", "1", "--prefill-len", "32", "--repeats", "1", "--threads", "1",
                   "--kernels", "aten,auto", "--fuse-linears", "on,off", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["decode_weight_bytes"] == result["decode_weight_bytes"] > 0
    assert {c["rows"] for c in saved["linear_ceilings"]} == {1, 16, 32}
    for kernel in ("aten/fused", "auto/fused", "aten/unfused", "auto/unfused"):
        steps = saved["variants"][kernel]["decode"]
        assert [d["batch"] for d in steps] == [1, 3]
        assert all(d["ms_per_step"] > 0 and d["ops_per_step"] >= d["ops_from_python_per_step"] > 0
                   for d in steps)
    assert set(saved["ratios_vs_aten/fused"]["auto/unfused"]) == {"decode_batch_1", "decode_batch_3", "prefill"}
    f = saved["prefill_flops"]
    assert f["tokens"] == 32 and f["attention_as_run"] >= f["attention_causal"] > 0
