"""Time to first image of `fae serve`: start it on a pipeline folder as a user would, ask for images through its API
and time (a) the page being ready, (b) the first chunk of images, (c) all of them, each from the command's start.

    python benchmarks/serve_first_image.py runs/demo/pipeline                    # a class-conditional pipeline
    python benchmarks/serve_first_image.py runs/text/pipeline --prompt "a red apple"
    python benchmarks/serve_first_image.py runs/demo/pipeline --screenshot docs/images/serve.png

`--screenshot` drives the page itself in headless Chromium (Debian's chromium + chromium-driver, through Selenium)
after the timed request, and saves it. The figures go to docs/benchmarks.md with the CPU they ran on.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


def post(url: str, payload: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def wait_ready(base: str, server: subprocess.Popen, start: float) -> tuple[float, dict[str, Any]]:
    while True:
        if server.poll() is not None:
            raise SystemExit(f"fae serve exited with {server.returncode}")
        try:
            return time.perf_counter() - start, get(base + "/api/config")
        except OSError:
            time.sleep(0.05)


def screenshot(base: str, path: Path, fields: dict[str, str], choice: str | None) -> None:
    """Fill the page's fields (`fields`: element id -> text; `choice`: the class to pick), generate, save the page."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,900"):
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        driver.get(base + "/")
        WebDriverWait(driver, 30).until(EC.presence_of_element_located((By.ID, "generate")))
        if choice is not None:
            Select(driver.find_element(By.ID, "class")).select_by_visible_text(choice)
        for element, text in fields.items():
            box = driver.find_element(By.ID, element)
            box.clear()
            box.send_keys(text)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 300).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#images a.image-link")))
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline")
    parser.add_argument("--prompt", help="for a text pipeline")
    parser.add_argument("-n", "--num-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale (1: none)")
    parser.add_argument("--guidance-max", type=float, default=1.0, help="guidance acts on t in [0, this]")
    parser.add_argument("--class", dest="choice", help="the class to ask for (default: all)")
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "fae", "serve", args.pipeline, "--port", str(port)])
    try:
        ready, config = wait_ready(base, server, start)
        payload: dict[str, Any] = {"num_images": args.num_images, "seed": 0, "steps": args.steps,
                                   "guidance_scale": args.guidance, "guidance_max": args.guidance_max}
        if args.choice is not None:
            payload["class"] = args.choice
        if args.prompt is not None:
            payload["prompt"] = args.prompt
        job = post(base + "/api/jobs", payload)
        first = None
        while True:
            state = get(f"{base}/api/jobs/{job['id']}")
            if first is None and state.get("done", 0) > 0:
                first = time.perf_counter() - start
            if state["status"] in ("done", "error"):
                break
            time.sleep(0.02)
        finished = time.perf_counter() - start
        if state["status"] == "error":
            raise SystemExit(f"the request failed: {state.get('error')}")
        print(json.dumps({"pipeline": args.pipeline, "kind": config.get("kind"), "images": args.num_images,
                          "steps": args.steps, "page_ready_s": round(ready, 2),
                          "first_images_s": round(first if first is not None else finished, 2),
                          "all_images_s": round(finished, 2)}))
        if args.screenshot:
            fields = {"num_images": str(args.num_images), "steps": str(args.steps), "guidance_scale": str(args.guidance),
                      "guidance_max": str(args.guidance_max), **({"prompt": args.prompt} if args.prompt else {})}
            screenshot(base, args.screenshot, fields, args.choice)
            print(f"screenshot: {args.screenshot}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
