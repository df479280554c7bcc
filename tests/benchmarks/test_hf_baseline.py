"""The HF generate() baseline runs both workloads and both sides produce the same greedy tokens."""

import json

import pytest
import torch

from benchmarks.hf_baseline import main, make_workload


@pytest.mark.parametrize("workload", ["uniform", "mixed"])
def test_hf_baseline_writes_rows_with_matching_tokens(tmp_path, workload):
    out = tmp_path / "hf.json"
    rows = main(["--batch-sizes", "3", "--new-tokens", "6", "--prompt-len", "8", "--repeats", "1",
                 "--workload", workload, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["workload"] == workload
    (row,) = rows
    assert row["batch"] == 3 and row["ponder_tok_s"] > 0 and row["hf_tok_s"] > 0
    assert row["same_tokens"]  # left padding in generate() must not change what the model says


def test_mixed_workload_varies_prompt_and_output_lengths():
    prompts, counts = make_workload("mixed", 16, 32, 64, 4096, torch.Generator().manual_seed(0))
    assert len(prompts) == len(counts) == 16
    assert all(8 <= len(p) <= 64 for p in prompts) and len({len(p) for p in prompts}) > 4
    assert all(16 <= n <= 128 for n in counts) and len(set(counts)) > 4
