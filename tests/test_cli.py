"`python -m vlmcourse.cli` is the `vlmcourse` command: the same entry point, the same exit codes."
import subprocess, sys


def cli(*args):
    return subprocess.run([sys.executable, "-m", "vlmcourse.cli", *args], capture_output=True, text=True, timeout=300)


def test_python_m_runs_the_command():
    out = cli("models")
    assert out.returncode == 0, out.stderr
    assert {"base", "aligned"} <= {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_python_m_reports_a_bad_command():
    out = cli("no-such-command")
    assert out.returncode == 2 and "invalid choice" in out.stderr
