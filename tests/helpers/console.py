"""What `evo-sft run` prints itself: its generation tables, the summary and its one-line notes.
Anything else in a run's output is a library's noise."""
import re

OURS = re.compile("|".join([
    r"generation \d+  \(optimizer step \d+ per member\)",
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
