"""Looking at the MLflow UI as a user does: Debian's chromium, headless, driven by Playwright (no
browser download), and screenshots under tests/artifacts/ that must show a rendered page."""
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.paths import REPO

ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
UI_TIMEOUT_MS = 60_000


def assert_real_screenshot(path: Path, min_size=(1000, 700)) -> None:
    """A PNG of a rendered page: the right signature and size, and more than a blank canvas."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{path}: {len(data)} bytes"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    total = sum(count for count, _ in colors)
    assert len(colors) > 50, f"{path}: only {len(colors)} colours"
    assert max(count for count, _ in colors) / total < 0.95, f"{path}: nearly a single colour"


def fresh_screenshots(*names: str) -> list[Path]:
    """tests/artifacts/NAME for each name, with no screenshot of an earlier test run left there."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    paths = [ARTIFACTS / name for name in names]
    for path in paths:
        path.unlink(missing_ok=True)
    return paths


@contextmanager
def browser_page():
    """A page of headless Chromium, 1400x1000, that waits up to UI_TIMEOUT_MS for what it is asked."""
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).is_file(), "install Debian's chromium: apt-get install -y chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            expect.set_options(timeout=UI_TIMEOUT_MS)
            yield page
        finally:
            browser.close()
