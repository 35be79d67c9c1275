import subprocess
import sys


def test_chat_answers_from_stdin_and_resets(tiny_model):
    result = subprocess.run(
        [sys.executable, "-m", "rlhf", "chat", "--model", str(tiny_model), "--max_new_tokens", "5"],
        input="Explain rain.\n/reset\nExplain snow.\n/exit\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model> ") == 2  # two questions answered; /reset and /exit are commands
    assert "Traceback" not in result.stderr
