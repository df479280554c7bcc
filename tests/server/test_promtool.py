"""`promtool check metrics` on the server's /metrics (promtool: Debian's prometheus package)."""

import shutil
import subprocess
import urllib.request

import pytest


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_metrics_exposition_passes_promtool_except_the_colon_naming_lint(server):
    base, _ = server
    urllib.request.urlopen(urllib.request.Request(f"{base}/v1/completions", data=b'{"prompt": "Anne", "max_tokens": 3}',
                                                  headers={"content-type": "application/json"}))
    text = urllib.request.urlopen(f"{base}/metrics").read()
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    problems = [line for line in (result.stdout + result.stderr).decode().splitlines() if line.strip()]
    # vLLM-style `ponder:` names draw promtool's naming lint (colons are meant for recording rules);
    # anything else would be a real exposition error.
    assert problems and all(p.endswith("metric names should not contain ':'") for p in problems), problems
