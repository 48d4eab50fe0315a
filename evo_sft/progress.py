"""The live progress line of a generation's training: the steps all members took out of all they
take, the time spent and left, and the supervised tokens per second. Drawn only on a terminal; the
line is removed when the generation's training ends, before its table is printed."""
import shutil
import sys
import time
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress_line(generation: int, total: int, unit: str = "step", stream=None):
    """Yields the `report` a population's `train` calls with {slot: (steps, tokens)}, or None
    where `stream` (default stdout) is not a terminal. The line counts `unit`s ("step" or
    "token") of all members out of `total`."""
    stream = stream or sys.stdout
    if not stream.isatty():
        yield None
        return
    size = shutil.get_terminal_size()  # 80x24 where a terminal reports no size (0x0), where tqdm would draw nothing
    bar = tqdm(total=total, desc=f"generation {generation}", unit=unit, leave=False, file=stream,
               ncols=size.columns, nrows=size.lines,
               bar_format="{desc}: {n_fmt}/{total_fmt} " + unit + "s |{bar}| {elapsed} elapsed, {remaining} left{postfix}")
    start = time.perf_counter()
    counted = 0 if unit == "step" else 1

    def report(done: dict[int, tuple[int, int]]) -> None:
        tokens = sum(t for _, t in done.values())
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f} tok/s", refresh=False)
        bar.update(min(sum(counts[counted] for counts in done.values()), total) - bar.n)

    try:
        yield report
    finally:
        bar.refresh()  # the last count, however soon after the previous drawing it came
        bar.close()
