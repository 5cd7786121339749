"""README screenshots of the web UI: serve the app, generate an example prompt in a headless Chromium, click a
word, and save

    docs/images/ui-generate.png   the page after Generate (the default word's overlay)
    docs/images/ui-word.png       after clicking another word chip
    docs/images/ui-grid.png       the "All words" tab

    python benchmarks/screenshots.py                         # the embedded model
    python benchmarks/screenshots.py --model /tmp/pipeline   # a Diffusers folder (copy one a trainer rewrites)

Needs Chromium (Debian: apt-get install chromium) and the playwright package; no browser download.
"""

import os
import socket
import sys
from pathlib import Path

from ui_latency import base_parser, make_service

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--word", default=None,
                        help="word chip to click (default: the prompt's next word after the one shown first)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="folder for the PNGs")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    parser.add_argument("--size", default="1400x1000", help="browser viewport, WIDTHxHEIGHT")
    args = parser.parse_args(argv)

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch
    from playwright.sync_api import sync_playwright

    from crossattn_sd.service import FUNCTION_WORDS
    from crossattn_sd.ui import build_demo, launch

    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.lower().split("x"))
    service = make_service(args.model)
    prompt = args.prompt or (service.defaults().examples or ("a photo of a cat on a red sofa",))[0]
    demo = build_demo(service)
    _, url, _ = launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.locator("#prompt textarea").fill(prompt)
            page.get_by_label("Seed").fill(str(args.seed))
            page.locator("#generate").click()
            page.locator("#overlay img").wait_for(timeout=300_000)
            chips = page.locator("#word-chips input")
            words = [chips.nth(i).get_attribute("value") for i in range(chips.count())]
            shown = page.locator("#word-chips input:checked").get_attribute("value")
            later = [w for w in words[words.index(shown) + 1:] if w not in FUNCTION_WORDS]
            word = args.word or (later or [w for w in words if w != shown] or [shown])[0]
            if word not in words:
                sys.exit(f"--word {word!r} is not a word chip; the chips are: {', '.join(words)}")
            page.wait_for_timeout(500)  # let the overlay's image finish loading
            page.screenshot(path=args.out / "ui-generate.png")

            before = page.locator("#overlay img").get_attribute("src")
            page.locator("#word-chips").get_by_text(word, exact=True).click()
            page.wait_for_function("src => document.querySelector('#overlay img').src !== src", arg=before,
                                   timeout=60_000)
            page.wait_for_timeout(500)
            page.screenshot(path=args.out / "ui-word.png")

            page.get_by_role("tab", name="All words").click()
            page.locator("#grid img").wait_for(timeout=60_000)
            page.wait_for_timeout(500)
            page.screenshot(path=args.out / "ui-grid.png")
            browser.close()
    finally:
        demo.close()
    print(f"prompt {prompt!r}: shown first {shown!r}, clicked {word!r}; wrote ui-generate.png, ui-word.png and "
          f"ui-grid.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
