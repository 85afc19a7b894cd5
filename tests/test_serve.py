"""`fae serve`: the page for a tiny class-conditional pipeline and a tiny text one. Over plain HTTP: the page's
config, every bad input as a one-line message (and the server still serving), the work budget, the same images as
the `fae sample` command the page shows, queued requests. In headless Chromium (Selenium on the system chromedriver,
no download): generate with a class and a seed and compare the PNG the page links with `fae sample`'s, a bad input's
message, two requests at once."""
from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_fae_config

from fae.cli import main
from fae.encoders import EncoderConfig, FrozenEncoder
from fae.generators import DiTGenerator, GeneratorRecord
from fae.models.autoencoder import FeatureAutoEncoder
from fae.models.dit import DiT, DiTConfig
from fae.models.pixel_decoder import PixelDecoder, PixelDecoderConfig
from fae.pipeline import GenerationPipeline
from fae.serve import SampleServer, SampleService, ServeLimits, serve
from fae.tokenizers import FAE

CLASSES = ["tee", "bag", "boot"]
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _pipeline(root: Path, encoder_dir: Path, generator: str = "dit") -> Path:
    """A GenerationPipeline folder from seeded untrained parts (as tests/test_portable.py builds one): the tiny FAE
    tokenizer and a DiT with three named classes, or a text MMDiT on the shipped MiniLM (8 tokens)."""
    encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(encoder_dir)))
    torch.manual_seed(0)
    pd = PixelDecoder(PixelDecoderConfig(in_dim=32, num_tokens=16, patch_size=4, width=32, depth=1, num_heads=2,
                                         refine_channels=0))
    tokenizer = FAE(encoder, FeatureAutoEncoder(tiny_fae_config()), pd).save_pretrained(root / "tokenizer")
    manifest = {"source": "fae", "channels": 4, "grid": [4, 4], "encoder": encoder.reference(),
                "fae": {"weights_sha256": FAE.from_pretrained(tokenizer).identity}}
    cache = SimpleNamespace(manifest=manifest, path=root / "latents", stats=lambda: {"mean": [0.0] * 4, "std": [1.0] * 4})
    if generator == "dit":
        manifest["class_names"] = CLASSES
        dit = DiT(DiTConfig(input_size=(4, 4), in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3))
        gen = DiTGenerator(dit, GeneratorRecord.from_cache(cache), "made here")
    else:
        from fae.encoders.text import TextEncoderConfig
        from fae.generators.mmdit import MMDiTGenerator
        from fae.models.mmdit import MMDiT, MMDiTConfig

        text = {"kind": "minilm", "name_or_path": TextEncoderConfig().source(), "revision": None, "max_length": 8,
                "dim": 384}
        mmdit = MMDiT(MMDiTConfig(input_size=(4, 4), in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=384,
                                  text_tokens=8, caption_dropout=0.2))
        gen = MMDiTGenerator(mmdit, GeneratorRecord.from_cache(cache, text={"encoder": text}), "made here")
    gen.save_pretrained(root / "generator-bundle")
    return GenerationPipeline.from_parts(root / "generator-bundle", tokenizer).save_pretrained(root / "pipeline")


class Running:
    """A SampleServer on a free port in a thread."""

    def __init__(self, folder: Path, limits: ServeLimits | None = None) -> None:
        self.service = SampleService(GenerationPipeline.from_pretrained(folder), folder, limits).start()
        self.server = SampleServer(self.service, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = self.server.url.rstrip("/")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.service.stop()

    def call(self, path: str, body: object = None, headers: dict[str, str] | None = None,
             data: bytes | None = None) -> tuple[int, object]:
        if body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers=headers or {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as reply:
                raw, status, kind = reply.read(), reply.status, reply.headers["Content-Type"]
        except urllib.error.HTTPError as exc:
            raw, status, kind = exc.read(), exc.code, exc.headers["Content-Type"]
        return status, json.loads(raw) if kind == "application/json" else raw

    def finished(self, job: dict) -> dict:
        deadline = time.time() + 60
        while job["status"] not in ("done", "error") and time.time() < deadline:
            time.sleep(0.02)
            _, job = self.call(f"/api/jobs/{job['id']}")  # type: ignore[assignment]
        return job


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_encoder_dir):
    root = tmp_path_factory.mktemp("serve")
    return {"class": _pipeline(root / "class", tiny_encoder_dir)}


@pytest.fixture(scope="module")
def running(folders):
    server = Running(folders["class"], ServeLimits(max_images=12, max_steps=40, budget=160, max_queue=4))
    yield server
    server.close()


def _cli_images(argv: list[str], out: Path) -> np.ndarray:
    """Run the `fae sample` command the page shows (its arguments after `fae`), into `out`."""
    argv = [*argv[:-1], str(out), "--no-progress"]   # its --out goes to the test's folder
    assert argv[-3] == "--out" and main(argv) == 0
    return np.load(out / "samples.npz")["arr_0"]


def test_config_tells_the_page_what_the_generator_takes(running):
    status, cfg = running.call("/api/config")
    assert status == 200 and cfg["kind"] == "class" and cfg["class_names"] == CLASSES and cfg["guidance"]
    assert cfg["samplers"] == ["auto", "euler", "heun", "euler_maruyama", "dpmpp_2m"] and cfg["limits"]["budget"] == 160
    status, page = running.call("/")
    assert status == 200 and b'id="generate"' in page


@pytest.mark.parametrize(("body", "message"), [
    ({"class": "sock"}, "unknown class 'sock'; this generator knows: tee, bag, boot"),
    ({"class": "3"}, "unknown class '3'"),
    ({"steps": 0}, "steps must lie in [1, 40]"),
    ({"steps": 41}, "steps must lie in [1, 40]"),
    ({"steps": "many"}, "steps must be a whole number, got 'many'"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"num_images": 13, "steps": 1}, "num_images must lie in [1, 12]"),
    ({"num_images": 0}, "num_images must lie in [1, 12]"),
    ({"seed": -1}, "seed must lie in"),
    ({"sampler": "ddim"}, "unknown sampler 'ddim'"),
    ({"guidance_scale": 2, "guidance_min": 0.8, "guidance_max": 0.2}, "guidance_max must lie in [0.8, 1]"),
    ({"guidance_scale": "nan"}, "guidance_scale must be a finite number"),
    ({"prompt": "a boot"}, "this generator takes no prompts"),
    ({"colour": "red"}, "unknown field(s) colour"),
    ([1, 2], "the request must be a JSON object"),
])
def test_every_bad_input_is_one_line_and_the_server_keeps_serving(running, body, message):
    status, reply = running.call("/api/jobs", body)
    assert status == 400 and message in reply["error"] and "Traceback" not in reply["error"]
    status, job = running.call("/api/jobs", {"class": "tee", "num_images": 1, "steps": 1})
    assert status == 202 and running.finished(job)["status"] == "done"


def test_malformed_requests_and_foreign_hosts_are_refused(running):
    assert running.call("/api/jobs", data=b"{not json", headers={"Content-Type": "application/json"}) == (
        400, {"error": "the request is not valid JSON"})
    status, reply = running.call("/api/jobs", data=b"{}", headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in reply["error"]      # a cross-site form cannot post JSON
    status, reply = running.call("/api/config", headers={"Host": f"evil.example:{running.server.server_address[1]}"})
    assert status == 403                                                  # DNS rebinding: another name for 127.0.0.1
    assert running.call("/api/jobs/0123456789ab")[0] == 404 and running.call("/nowhere")[0] == 404


def test_the_work_budget_is_checked_up_front(running):
    """budget 160: images x steps (x2 with guidance, x2 for heun) up to 160 runs, one more image is refused."""
    assert running.call("/api/jobs", {"num_images": 4, "steps": 40})[0] == 202
    status, reply = running.call("/api/jobs", {"num_images": 5, "steps": 40})
    assert status == 400 and "5 images x 40 network evaluations = 200 > the server's budget of 160" in reply["error"]
    status, reply = running.call("/api/jobs", {"num_images": 4, "steps": 40, "guidance_scale": 2})
    assert status == 400 and "x 80 network evaluations" in reply["error"]
    status, reply = running.call("/api/jobs", {"num_images": 4, "steps": 40, "sampler": "heun"})
    assert status == 400 and "x 80 network evaluations" in reply["error"]


def test_the_page_samples_what_fae_sample_writes_and_requests_queue(running, tmp_path):
    """Two requests at once both finish, one after the other; each one's images are those of the `fae sample`
    command it shows, byte for byte through the PNGs it serves."""
    body = {"class": "boot", "num_images": 5, "seed": 7, "steps": 6, "guidance_scale": 2.5, "guidance_min": 0.1,
            "guidance_max": 0.9, "sampler": "euler"}
    first = running.call("/api/jobs", body)[1]
    second = running.call("/api/jobs", {**body, "class": "random", "sampler": "heun", "steps": 3})[1]
    first, second = running.finished(first), running.finished(second)
    assert (first["status"], second["status"]) == ("done", "done")
    assert second["settings"]["generate"]["labels"] == "random"
    for job, name in ((first, "first"), (second, "second")):
        settings = job["settings"]
        served = np.stack([np.asarray(Image.open(io.BytesIO(running.call(url)[1]))) for url in job["images"]])
        assert np.array_equal(served, _cli_images(settings["argv"], tmp_path / name))
    command = first["settings"]["command"]
    assert "--labels 2 " in command and "--sampler euler --steps 6 " in command and "--guidance 0.1-0.9:2.5" in command
    assert first["settings"]["generate"]["sampler"]["guidance"]["intervals"] == [
        {"t_min": 0.1, "t_max": 0.9, "scale": 2.5}]
    grid = running.call(first["grid"])[1]
    assert Image.open(io.BytesIO(grid)).size[0] > 5 * 16      # a labelled row of five


def test_a_text_pipeline_gets_a_prompt_box(tiny_encoder_dir, tmp_path):
    server = Running(_pipeline(tmp_path, tiny_encoder_dir, "mmdit"), ServeLimits(budget=100))
    try:
        cfg = server.call("/api/config")[1]
        assert cfg["kind"] == "text" and cfg["guidance"] and cfg["class_names"] == []  # type: ignore[index]
        status, reply = server.call("/api/jobs", {"prompt": "  \n ", "steps": 2})
        assert status == 400 and "type a prompt" in reply["error"]  # type: ignore[index]
        status, reply = server.call("/api/jobs", {"class": "bag", "prompt": "a bag", "steps": 2})
        assert status == 400 and "takes prompts, not classes" in reply["error"]  # type: ignore[index]
        job = server.finished(server.call("/api/jobs", {"prompt": "a red square\na blue square", "num_images": 2,
                                                          "steps": 2, "seed": 1})[1])  # type: ignore[arg-type]
        assert job["status"] == "done" and job["settings"]["argv"].count("--prompt") == 2
        assert np.array_equal(np.stack([np.asarray(Image.open(io.BytesIO(server.call(u)[1]))) for u in job["images"]]),
                              _cli_images(job["settings"]["argv"], tmp_path / "cli"))
    finally:
        server.close()


def test_serving_beyond_this_machine_warns(folders, capsys):
    def stop_soon(server: SampleServer) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    serve(folders["class"], host="0.0.0.0", port=0, ready=stop_soon)
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0" in err and "no authentication" in err
    serve(folders["class"], port=0, ready=stop_soon)
    assert "warning" not in capsys.readouterr().err


def test_the_demo_report_ends_with_fae_serve():
    from fae.demo.report import _serve_section

    section = _serve_section("runs/demo/pipeline")
    assert "fae serve runs/demo/pipeline" in " ".join(section.text)


# --------------------------------------------------------------------------------------------------- browser
def _browser(monkeypatch: pytest.MonkeyPatch):
    """Headless Chromium through the system chromedriver (an explicit Service path: Selenium Manager neither looks
    for nor downloads a driver or browser); None when it is not installed."""
    if not CHROMEDRIVER.is_file() or not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")     # and should Selenium Manager run anyway: no downloads
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,900"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def test_in_a_browser(running, tmp_path, monkeypatch):
    """Costs about 3 s on a 2-core CPU (Chromium's start, most of it)."""
    pytest.importorskip("selenium", reason="the browser test needs selenium (requirements/test.txt)")
    driver = _browser(monkeypatch)
    if driver is None:
        pytest.skip("chromium and chromium-driver are not installed (scripts/setup.sh --test installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, 30)
    try:
        driver.get(running.url + "/")
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#class option[value=boot]")))
        Select(driver.find_element(By.ID, "class")).select_by_value("boot")
        for name, value in (("num_images", "3"), ("seed", "11"), ("steps", "5")):
            field = driver.find_element(By.ID, name)
            field.clear()
            field.send_keys(value)
        Select(driver.find_element(By.ID, "sampler")).select_by_value("euler")
        driver.find_element(By.ID, "generate").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#images a.image-link")))
        links = driver.find_elements(By.CSS_SELECTOR, "#images a.image-link")
        assert len(links) == 3 and links[0].get_attribute("download") == "000000.png"
        fetched = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {
              let s = ""; new Uint8Array(b).forEach(c => { s += String.fromCharCode(c); }); done(btoa(s)); });
        """, links[0].get_attribute("href"))
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(fetched))))
        settings = json.loads(driver.find_element(By.ID, "settings").text)
        assert settings["command"] == driver.find_element(By.ID, "command").text
        assert np.array_equal(shown, _cli_images(settings["argv"], tmp_path / "cli")[0])

        # a bad input: the message in the page, and the page still works
        steps = driver.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("999")
        driver.find_element(By.ID, "generate").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "message"), "steps must lie in [1, 40]"))

        # two requests at once from the page's own script context: both finish
        states = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const post = (body) => getJSON("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                                         body: JSON.stringify(body)}).then(job => follow(job.id));
            Promise.all([post({class: "tee", num_images: 2, steps: 4}), post({class: "bag", num_images: 2, steps: 4})])
              .then(jobs => done(jobs.map(j => j.status)), error => done(String(error)));
        """)
        assert states == ["done", "done"]
    finally:
        driver.quit()
