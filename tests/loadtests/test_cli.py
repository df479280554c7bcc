"""`ponder loadtest` refuses bad input with a clear message and exit code 2, before sending anything."""

import pytest

from ponder.cli import main


@pytest.mark.parametrize("args, message", [
    (["--budgets", "1.0,1.5"], "outside (0, 1]"),
    (["--budgets", "0"], "outside (0, 1]"),
    (["--num-prompts", "0"], "--num-prompts"),
    (["--request-rates", "1,2", "--concurrencies", "4"], "not both"),
    (["--request-rates", "-1"], "positive rate"),
    (["--concurrencies", "0"], "at least 1"),
    (["--max-duration", "0"], "--max-duration"),
    (["--dataset", "file"], "--prompt-file"),
    (["--prompt-file", "/nonexistent/prompts.txt"], "does not exist"),
    (["--goodput", "ttft=5"], "--goodput"),
    (["--soak", "60"], "finite --request-rates"),
    (["--soak", "60", "--request-rates", "2", "--budgets", "1,0.5"], "one budget"),
    (["--base-url", "http://192.168.1.20:8000"], "--allow-remote"),
])
def test_bad_arguments_exit_2_with_the_fix(args, message, capsys, tmp_path):
    assert main(["loadtest", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_no_server_is_a_clear_error_not_a_traceback(capsys, tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as e:
        main(["loadtest", "--base-url", f"http://127.0.0.1:{port}", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "no OpenAI-compatible server answers" in capsys.readouterr().err


def test_the_load_generator_runs_without_the_ponder_command(capsys, tmp_path):
    from loadtests.cli import main as loadtest_main  # `python -m loadtests.cli`: loadtests imports nothing of ours

    assert loadtest_main(["--budgets", "1.5", "--out", str(tmp_path)]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err
