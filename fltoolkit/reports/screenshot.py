"""Screenshot a report in headless Chromium, to check what a reader sees.

    python -m fltoolkit.reports.screenshot runs/taobao/version_0/report.html shot.png

Needs Debian's `chromium` package (`apt-get install chromium`); fltk itself does not. The
flags keep Chromium off the network (this machine has none) and out of the user's profile.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, out: Path, width: int = 1100, height: int = 6000,
               timeout_s: float = 120.0) -> Path:
    """Render `page` (an HTML file) at width x height pixels into the PNG `out`."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found: install Debian's chromium package")
    with tempfile.TemporaryDirectory(prefix="fltk_chromium_") as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        f"--window-size={width},{height}", f"--screenshot={out.resolve()}",
                        page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=timeout_s)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="report.html or comparison.html")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=6000)
    args = parser.parse_args()
    print(screenshot(args.page, args.out, args.width, args.height))


if __name__ == "__main__":
    main()
