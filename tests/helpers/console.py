"""What `evo-sft run` prints itself: its generation tables, the summary and its one-line notes.
Anything else in a run's output is a library's noise. And what a program writes to a terminal."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import termios

OURS = re.compile("|".join([
    r"generation \d+  \((optimizer step \d+ per member|[\d,]+ supervised tokens trained)\)",
    r"  member +\w+.*",  # a table's header
    r" [* ] *\d+ .*",  # a table's row
    r"  clones: .*",
    r"=== evo-sft summary ===",
    r"(run folder|best member|lineage|fitness per generation|founders'|outputs on the first test prompts|checkpoints|"
    r"best adapter|MLflow UI|MLflow runs|MLflow run|resume/extend).*",
    r"  prompt '.*",
    r"",
]))


def foreign_lines(output: str) -> list[str]:
    """The lines of a run's output (stdout and stderr) that evo-sft did not print."""
    return [line for line in output.splitlines() if not OURS.fullmatch(line)]


def on_a_terminal(argv: list[str], rows: int = 24, columns: int = 80, timeout: float = 120, env: dict | None = None,
                  cwd=None) -> bytes:
    """Every byte that the program `argv` writes to a pseudo-terminal of `rows` x `columns` (its
    stdin, stdout and stderr), once it has exited with code 0."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {name: value for name, value in (env or os.environ).items() if name not in ("COLUMNS", "LINES")}
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    written = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        written += chunk
    os.close(master)
    assert process.wait(timeout) == 0, written.decode(errors="replace")[-6000:]
    return written
