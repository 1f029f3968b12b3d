"""In-browser sampling speed of `chargpt export --format web`: headless Chromium (Debian's chromium +
chromium-driver, driven by selenium) opens the exported page from disk and generates 200 characters (inside
the context window, fewer for a shorter window) at temperature 0.8 with a fixed seed; the page's own clock
gives characters per second.

Two shapes, random weights: the demo model (the cpu preset: n_embd 128, 4 heads, 4 layers, block 128) and the
seed model (n_embd 384, 6 heads, 6 layers, block 256; 10.8M parameters). The page is one JavaScript thread.

    python benchmarks/bench_web.py [--chars 200]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from bench_sample import VOCAB
from chargpt.config import GPTConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.inference.export import export
from chargpt.machine import precision as prec
from chargpt.model import GPT
from chargpt.storage.checkpoint import save_model
from cpuflags import shown_flags

SHAPES = {
    "demo (cpu preset)": dict(block_size=128, n_embd=128, n_heads=4, n_layers=4),
    "seed": dict(block_size=256, n_embd=384, n_heads=6, n_layers=6),
}


def browser(profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    flags = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={profile}")
    for flag in flags:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def measure(driver: webdriver.Chrome, page: Path, chars: int) -> float:
    driver.get(page.as_uri())
    while driver.execute_script("return document.body.dataset.ready") != "1":
        time.sleep(0.05)
    length = driver.find_element(By.ID, "max_tokens")
    length.clear()
    length.send_keys(str(chars))
    driver.find_element(By.ID, "seed").send_keys("1")
    driver.find_element(By.ID, "generate").click()
    while not (last := driver.execute_script("return window.chargptLast")):
        time.sleep(0.05)
    return last["chars"] / last["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chars", type=int, default=200)
    a = p.parse_args()
    info = prec.cpu_info()
    print(f"CPU: {info.model}; flags: {shown_flags(info)}; load average {os.getloadavg()[0]:.2f}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        driver = browser(Path(tmp) / "profile")
        try:
            for name, shape in SHAPES.items():
                torch.manual_seed(0)
                model = GPT(GPTConfig(vocab_size=len(VOCAB), dropout=0.0, **shape)).eval()
                model_dir = Path(tmp) / name.split()[0]
                save_model(model_dir, model, CharTokenizer(VOCAB), info={"note": "random weights for bench_web"})
                site = export(model_dir, Path(tmp) / f"{model_dir.name}-site", "web")
                chars = min(a.chars, shape["block_size"] - len("ROMEO:\n"))  # inside the window
                rates = [measure(driver, site / "index.html", chars) for _ in range(2)]
                results[name] = round(max(rates), 1)
                print(f"{name:<18} {model.num_params() / 1e6:5.2f}M params: {max(rates):7.1f} chars/s in the browser "
                      f"(best of 2; {chars} characters, all inside the window)")  # fmt: skip
        finally:
            driver.quit()
    print(json.dumps({"bench": "web", "flags": shown_flags(info), "chars_per_s": results}))


if __name__ == "__main__":
    main()
