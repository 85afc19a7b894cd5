"""What a `fae serve` request asks for, checked against the pipeline and the work cap before anything runs, and the
one worker that samples the requests in turn through fae.sampling.generate (the function `fae sample` runs)."""
from __future__ import annotations

import io
import math
import queue
import shlex
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fae.config import ConfigError, to_dict
from fae.pipeline import GenerationPipeline
from fae.sampling import generate, image_grid, sample_conditions, sampler_config
from fae.transport import SamplerConfig


@dataclass
class ServeLimits:
    """What one request may ask for. `budget` caps its work up front: images x network evaluations per image (steps,
    x2 for Heun, x2 with guidance; a flow: its latent tokens, x2 with guidance), so no request holds the CPU for long."""

    max_images: int = 64
    max_steps: int = 1000
    budget: int = 10_000
    max_queue: int = 8           # requests waiting behind the running one; more are refused as "busy"
    batch_size: int = 4          # images per chunk: progress is reported after each chunk
    keep_jobs: int = 16          # finished jobs whose images stay available

    @property
    def default_steps(self) -> int:
        """What the page proposes: 50 steps (a CPU's patience, not the paper's 250), within max_steps."""
        return min(50, self.max_steps)


REQUEST_KEYS = ("class", "prompt", "num_images", "seed", "guidance_scale", "guidance_min", "guidance_max", "sampler",
                "steps")


@dataclass
class SampleRequest:
    """One checked request: the arguments of fae.sampling.generate and the `fae sample` flags that say the same."""

    num_images: int
    seed: int
    labels: str                  # `--labels`: equal | random | one class id
    prompts: list[str]
    guidance: str                # `--guidance`
    method: str                  # `--sampler` (auto or one of fae.transport.FIXED_STEP_METHODS)
    steps: int
    sampler: SamplerConfig
    work: int                    # images x network evaluations, against ServeLimits.budget

    def sample_argv(self, pipeline: str | Path, batch_size: int, precision: str, samplers: bool) -> list[str]:
        """The `fae sample` command that writes exactly these images."""
        argv = ["fae", "sample", "--pipeline", str(pipeline), "-n", str(self.num_images), "--seed", str(self.seed),
                "--batch-size", str(batch_size), "--precision", precision, "--guidance", self.guidance]
        if self.prompts:
            for p in self.prompts:
                argv += ["--prompt", p]
        else:
            argv += ["--labels", self.labels]
        if samplers:
            argv += ["--sampler", self.method, "--steps", str(self.steps)]
        return [*argv, "--out", "samples"]


def _number(payload: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    value = payload.get(key, default)
    if value is None or value == "":
        value = default
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a {'whole ' if kind is int else ''}number, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise ConfigError(f"{key} must be a whole number, got {value!r}")
    if kind is float and not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return number


def _in_range(name: str, value: float, low: float, high: float, hint: str = "") -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must lie in [{low:g}, {high:g}], got {value:g}{hint}")


def _class_labels(payload: dict[str, Any], class_names: list[str] | None, num_classes: int) -> str:
    """The page's class choice as `--labels`: all (equal), random, or one class by name or id."""
    choice = str(payload.get("class", "all") or "all").strip()
    if choice in ("all", "equal"):
        return "equal"
    if choice == "random":
        return "random"
    names = class_names or []
    if choice in names:
        return str(names.index(choice))
    if choice.isdigit() and int(choice) < num_classes:
        return choice
    known = ", ".join(names) if names else f"ids 0..{num_classes - 1}"
    raise ConfigError(f"unknown class {choice!r}; this generator knows: {known} (or all, random)")


def _guidance_text(payload: dict[str, Any]) -> str:
    """Scale and interval as the `--guidance` text (none when the scale is 1)."""
    scale = _number(payload, "guidance_scale", 1.0, float)
    low, high = _number(payload, "guidance_min", 0.0, float), _number(payload, "guidance_max", 1.0, float)
    _in_range("guidance_scale", scale, 0.0, 20.0)
    _in_range("guidance_min", low, 0.0, 1.0)
    _in_range("guidance_max", high, low, 1.0, " (the interval's end must not lie before its start)")
    return "none" if scale == 1.0 else f"{low!r}-{high!r}:{scale!r}"


def _conditions(payload: dict[str, Any], pipe: GenerationPipeline, num_images: int) -> tuple[str, list[str]]:
    """`--labels` and the prompts (one per line) the request names; fae.sampling.sample_conditions then checks
    that they fit the generator."""
    gen = pipe.generator
    prompts = [line.strip() for line in str(payload.get("prompt") or "").splitlines() if line.strip()]
    if gen.condition_kind == "text":
        if not prompts:
            raise ConfigError("this generator is text-conditional: type a prompt (one per line for several)")
        if len(prompts) > num_images:
            raise ConfigError(f"{len(prompts)} prompts but {num_images} images: give at least one image per prompt")
        if payload.get("class") not in (None, "", "all"):
            raise ConfigError("this generator takes prompts, not classes")
        return "equal", prompts
    if gen.condition_kind == "class":
        return _class_labels(payload, gen.class_names, gen.num_classes), prompts
    if payload.get("class") not in (None, "", "all"):
        raise ConfigError("this generator is unconditional: it takes no class")
    return "equal", prompts


def network_evaluations(pipe: GenerationPipeline, sampler: SamplerConfig) -> int:
    """Network evaluations one image costs: a velocity model's steps (Heun: two per step), a flow's latent tokens
    (its inverse runs token by token); twice that where guidance adds the unconditional pass."""
    gen = pipe.generator
    if gen.sampler_methods:
        passes = sampler.steps * (2 if sampler.method == "heun" else 1)
    else:
        _, h, w = gen.latent_shape
        passes = h * w
    return passes * (2 if sampler.guidance.active else 1)


def parse_request(payload: Any, pipe: GenerationPipeline, limits: ServeLimits) -> SampleRequest:
    """Check a request against the generator and the limits; ConfigError names the first bad input."""
    if not isinstance(payload, dict):
        raise ConfigError("the request must be a JSON object")
    unknown = sorted(set(payload) - set(REQUEST_KEYS))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(REQUEST_KEYS)}")
    gen = pipe.generator
    num_images = _number(payload, "num_images", min(8, limits.max_images), int)
    _in_range("num_images", num_images, 1, limits.max_images, " (the server's --max-images)")
    seed = _number(payload, "seed", 0, int)
    _in_range("seed", seed, 0, 2**63 - 1)
    methods = gen.sampler_methods
    method = str(payload.get("sampler") or "auto") if methods else "auto"
    if method != "auto" and method not in methods:
        raise ConfigError(f"unknown sampler {method!r}; this generator offers: auto, {', '.join(methods)}")
    steps = _number(payload, "steps", limits.default_steps, int) if methods else SamplerConfig().steps
    if methods:
        _in_range("steps", steps, 1, limits.max_steps, " (the server's --max-steps)")
    guidance = _guidance_text(payload)
    sampler = sampler_config(guidance, method, steps)
    labels, prompts = _conditions(payload, pipe, num_images)
    sample_conditions(gen, num_images, labels, prompts or None, seed, sampler)  # guidance without a null branch, ...
    work = num_images * network_evaluations(pipe, sampler)
    if work > limits.budget:
        raise ConfigError(f"too much work for one request: {num_images} images x {work // num_images} network "
                          f"evaluations = {work} > the server's budget of {limits.budget} (--budget); ask for fewer "
                          "images or steps")
    return SampleRequest(num_images, seed, labels, prompts, guidance, method, steps, sampler, work)


# ------------------------------------------------------------------------------------------------------ jobs
@dataclass
class Job:
    id: str
    request: SampleRequest
    status: str = "queued"            # queued | running | done | error
    done: int = 0
    error: str | None = None
    images: list[bytes] = field(default_factory=list)   # PNG files
    grid: bytes | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None


def _png(image: Any) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    (image if hasattr(image, "save") else Image.fromarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


class SampleService:
    """A loaded pipeline and one worker thread: requests queue and run one at a time (sampling takes the CPU's
    cores; two at once would only share them)."""

    def __init__(self, pipe: GenerationPipeline, source: str | Path, limits: ServeLimits | None = None,
                 precision: str = "auto", compile: str = "auto") -> None:
        self.pipe, self.source, self.limits = pipe, str(source), limits or ServeLimits()
        self.precision, self.compile = precision, compile
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="fae-serve-worker", daemon=True)
        self.pipe.tokenizer.compile_networks(compile, self.pipe.device)   # as `fae sample --pipeline` does

    def start(self) -> SampleService:
        self._worker.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)

    def config(self) -> dict[str, Any]:
        """What the page offers: the condition kind, class names, samplers and the limits."""
        gen, limits = self.pipe.generator, self.limits
        return {"pipeline": self.source, "kind": gen.condition_kind,
                "class_names": gen.class_names or [str(i) for i in range(gen.num_classes)],
                "samplers": ["auto", *gen.sampler_methods] if gen.sampler_methods else [],
                "guidance": gen.supports_guidance, "limits": to_dict(limits),
                "defaults": {"num_images": min(8, limits.max_images), "seed": 0, "steps": limits.default_steps,
                             "guidance_scale": 1.0}}

    def submit(self, payload: Any) -> Job:
        request = parse_request(payload, self.pipe, self.limits)
        with self._lock:
            waiting = sum(j.status == "queued" for j in self.jobs.values())
            if waiting >= self.limits.max_queue:
                raise ConfigError(f"the server is busy: {waiting} requests are waiting; try again when they finish")
            job = Job(uuid.uuid4().hex[:12], request)
            self.jobs[job.id] = job
            self._forget_old()
        self._queue.put(job)
        return job

    def _forget_old(self) -> None:
        finished = [k for k, j in self.jobs.items() if j.status in ("done", "error")]
        for key in finished[:max(0, len(finished) - self.limits.keep_jobs)]:
            del self.jobs[key]

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def describe(self, job: Job) -> dict[str, Any]:
        """The job's state for the page (no image bytes: those have their own addresses)."""
        with self._lock:
            ahead = sum(j.status in ("queued", "running") and j.created < job.created for j in self.jobs.values())
        out: dict[str, Any] = {"id": job.id, "status": job.status, "done": job.done, "total": job.request.num_images,
                               "ahead": ahead if job.status == "queued" else 0, "error": job.error}
        if job.status == "done":
            out["images"] = [f"/api/jobs/{job.id}/images/{i:06d}.png" for i in range(len(job.images))]
            out["grid"] = f"/api/jobs/{job.id}/grid.png"
            out["settings"] = job.settings
        return out

    # ---------------------------------------------------------------------------------------------- the worker
    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            job.status, job.started = "running", time.time()
            try:
                self._run(job)
                job.status = "done"
            except ConfigError as exc:
                job.status, job.error = "error", str(exc)
            except Exception as exc:  # the worker survives anything one request does; the page gets one line
                traceback.print_exc(file=sys.stderr)
                job.status, job.error = "error", f"sampling failed ({type(exc).__name__}: {exc})"
            job.finished = time.time()

    def _run(self, job: Job) -> None:
        r, pipe, gen = job.request, self.pipe, self.pipe.generator

        def progress(done: int, total: int) -> None:
            job.done = done

        samples = generate(gen, pipe.tokenizer.decode, r.num_images, seed=r.seed, labels=r.labels,
                           sampler=r.sampler, batch_size=self.limits.batch_size, device=pipe.device, progress=False,
                           precision=self.precision, prompts=r.prompts or None, compile=self.compile,  # type: ignore[arg-type]  # checked by compile_wanted
                           on_progress=progress)
        rows = r.prompts or gen.class_names
        job.grid = _png(image_grid(samples.images, samples.labels, rows))
        job.images = [_png(np.ascontiguousarray(img)) for img in samples.images]
        argv = r.sample_argv(self.source, self.limits.batch_size, self.precision, bool(gen.sampler_methods))
        job.settings = {"request": {"num_images": r.num_images, "seed": r.seed, "labels": r.labels,
                                    "prompts": r.prompts, "guidance": r.guidance, "sampler": r.method,
                                    "steps": r.steps, "work": r.work},
                        "command": shlex.join(argv), "argv": argv[1:], "seconds": round(time.time() - (job.started
                                                                                                      or 0), 3),
                        "class_names": gen.class_names, "generate": samples.settings}
