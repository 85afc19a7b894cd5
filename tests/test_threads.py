"""Sample-parallel CPU work (fae.threads): a fake timing makes `auto` split the batch or not, the parts give the
batch's velocity in the caller's modes and, under autograd, the batch's gradients, the thread count is left as it
was, and a measurement that calls the model does not wait for itself."""
from __future__ import annotations

import functools
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fae.kernels as K
import fae.threads as T
from fae.models.dit import DiT, DiTConfig


@pytest.fixture
def fresh(fresh):
    """conftest's fresh verdicts, on two threads (a split needs two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield fresh
    torch.set_num_threads(threads)


def tiny_dit(hidden: int = 64, side: int = 4) -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=(side, side), in_channels=4, hidden_size=hidden, depth=2, num_heads=2,
                          num_classes=10)).eval()
    with torch.no_grad():  # adaLN-Zero starts as the identity: give every weight a value, so rows really differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def unsplit(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The model's velocity computed as one batch, whatever the verdict."""
    return model._velocity(x, model.t_embedder(t) + model.y_embedder(y))


def spy_on_parts(monkeypatch) -> list[str]:
    """The names of the threads that ran a part."""
    ran: list[str] = []
    part = T._part

    def recorded(*args, **kwargs):
        ran.append(threading.current_thread().name)
        return part(*args, **kwargs)
    monkeypatch.setattr(T, "_part", recorded)
    return ran


@pytest.mark.parametrize("winner", ["split", "whole"])
def test_a_fake_timing_makes_auto_split_or_not_and_both_give_the_batchs_velocity(fresh, monkeypatch, winner):
    timed: list[str] = []

    def measure_wall(candidates, repeats=3):
        timed.extend(candidates)
        return {name: 1.0 if name == winner else 2.0 for name in candidates}
    monkeypatch.setattr(K, "measure_wall", measure_wall)
    monkeypatch.setattr(T, "SMALL_SPLIT", 1)  # a tiny model, timed as a large one would be
    ran = spy_on_parts(monkeypatch)
    model = tiny_dit()
    x, t, y = torch.randn(5, 4, 4, 4), torch.rand(5), torch.arange(5)
    with torch.no_grad():
        auto = model(x, t, y)
        model(x, t, y)
        whole = unsplit(model, x, t, y)
    assert timed == ["whole", "split"]  # measured once, then kept
    (verdict,) = [v for v in K.verdicts() if v.kind == "batch_split"]
    assert verdict.choice == winner and verdict.key.endswith("8x4x4x4 threads 2")  # batch 5 in the class of 8
    # split: two calls, each in two parts (3 + 2 samples) on the workers, never on the caller's thread
    assert len(ran) == (4 if winner == "split" else 0)
    assert all(name.startswith("fae-batch") for name in ran)
    torch.testing.assert_close(auto, whole, rtol=1e-6, atol=1e-6)


def test_the_parts_run_in_the_callers_autocast_and_inference_mode(fresh, monkeypatch):
    monkeypatch.setenv("FAE_BATCH_SPLIT", "split")
    ran = spy_on_parts(monkeypatch)
    model = tiny_dit()
    x, t, y = torch.randn(4, 4, 4, 4), torch.rand(4), torch.arange(4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        split = model(x, t, y)
        whole = unsplit(model, x, t, y)
    assert len(ran) == 2 and split.dtype == whole.dtype == torch.bfloat16  # autocast is per thread in PyTorch
    torch.testing.assert_close(split, whole, rtol=0, atol=0)
    with torch.inference_mode():
        inferred = model(x, t, y)
    assert inferred.is_inference() and len(ran) == 4
    with torch.no_grad():
        torch.testing.assert_close(inferred.clone(), unsplit(model, x, t, y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_split_training_step_gives_the_whole_batchs_loss_and_gradients(fresh, monkeypatch, checkpointed):
    """Under autograd each part records its graph on a worker and runs its backward there: the parameters'
    gradients are the parts' summed, the input's the parts' rows, and label dropout is drawn once for the batch on
    the caller's thread (the same draws as a whole call after the same seed); activation checkpointing recomputes
    each part's blocks on its worker."""
    ran = spy_on_parts(monkeypatch)
    jobs: list[int] = []
    on_workers = T._on_workers
    monkeypatch.setattr(T, "_on_workers", lambda work, threads: jobs.append(len(work)) or on_workers(work, threads))
    model = tiny_dit().train().double()  # float64: the parts' sums match the whole's to rounding far below the bound
    model.activation_checkpointing = checkpointed
    model.y_embedder.dropout = 0.5
    x, t, y = torch.randn(5, 4, 4, 4, dtype=torch.float64).requires_grad_(), torch.rand(5), torch.arange(5)
    target = torch.randn(5, 4, 4, 4, dtype=torch.float64)

    def step(how: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setenv("FAE_BATCH_SPLIT", how)
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(1)
        loss = F.mse_loss(model(x, t, y), target)
        loss.backward()
        return loss.detach(), {"x": x.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    loss, grads = step("split")
    assert len(ran) == 2 and all(name.startswith("fae-batch") for name in ran)
    assert jobs == [2, 2]  # the forward's parts, then their backwards, each on the workers
    whole_loss, whole_grads = step("whole")
    assert len(ran) == 2 and grads.keys() == whole_grads.keys()
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= grads.keys()  # embedders included
    torch.testing.assert_close(loss, whole_loss, rtol=1e-10, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_mmdit_splits_too_and_draws_its_caption_dropout_once(fresh, monkeypatch):
    """The text-to-image generator takes the same split: its velocity at inference and its gradients in training
    (captions dropped before the split, on the caller's thread) are the whole batch's; the text mask is split
    with its rows."""
    from fae.models.mmdit import MMDiT, TextCondition, mmdit_config

    ran = spy_on_parts(monkeypatch)
    torch.manual_seed(0)
    model = MMDiT(mmdit_config("tiny", input_size=(4, 4), in_channels=4, text_dim=16, text_tokens=5,
                               caption_dropout=0.5))
    for module in model.modules():  # leave adaLN-Zero so the output depends on its inputs
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.2)
    model.double()  # float64: the parts' sums are the whole batch's to 1e-13 (fp32 rounding moves 1e-5 of 18)
    x, t, target = (torch.randn(5, 4, 4, 4, dtype=torch.float64), torch.rand(5, dtype=torch.float64),
                    torch.randn(5, 4, 4, 4, dtype=torch.float64))
    mask = torch.arange(5)[None] < torch.tensor([1, 5, 3, 2, 4])[:, None]
    y = TextCondition(torch.randn(5, 5, 16, dtype=torch.float64), mask, torch.randn(5, 16, dtype=torch.float64))

    def step(how: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setenv("FAE_BATCH_SPLIT", how)
        model.eval()
        with torch.no_grad():
            velocity = model(x, t, y)
        model.train().zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = F.mse_loss(model(x, t, y), target)
        loss.backward()
        return velocity, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    velocity, loss, grads = step("split")
    assert len(ran) == 4 and all(name.startswith("fae-batch") for name in ran)
    whole_velocity, whole_loss, whole_grads = step("whole")
    assert len(ran) == 4 and grads.keys() == whole_grads.keys()
    torch.testing.assert_close(velocity, whole_velocity, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-10, atol=1e-10)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_the_trainer_trains_split_and_resumes_to_the_same_weights(fresh, monkeypatch, tiny_latent_world, tmp_path):
    """`fae train dit` with the batch split: every step's forward and backward in parts on the workers, a run
    stopped at a checkpoint resumes to the weights of an uninterrupted one, bit for bit, and run.json says the
    split was forced."""
    import json

    from safetensors.torch import load_file
    from tiny import tiny_dit_yaml

    from fae.stages import load_stage_config, train_stage

    monkeypatch.setenv("FAE_BATCH_SPLIT", "split")
    ran = spy_on_parts(monkeypatch)
    cfg_file = tmp_path / "dit.yaml"
    cfg_file.write_text(tiny_dit_yaml(tiny_latent_world["cache"], steps=4))
    _, cfg = load_stage_config(cfg_file)
    train_stage("dit", cfg, tmp_path / "once", progress=False)
    assert len(ran) >= 8 and all(name.startswith("fae-batch") for name in ran)  # two parts a step, four steps
    train_stage("dit", cfg, tmp_path / "paused", progress=False, stop_at=2)
    train_stage("dit", cfg, tmp_path / "paused", progress=False)
    for name in ("model", "model.ema"):
        once = load_file(str(tmp_path / "once" / "checkpoints" / "step_00000004" / f"{name}.safetensors"))
        resumed = load_file(str(tmp_path / "paused" / "checkpoints" / "step_00000004" / f"{name}.safetensors"))
        assert once.keys() == resumed.keys() and all(torch.equal(once[k], resumed[k]) for k in once), name
    overrides = json.loads((tmp_path / "once" / "run.json").read_text())["kernels"]["overrides"]
    assert overrides["FAE_BATCH_SPLIT"] == "split"


def test_a_split_keeps_its_graph_where_backward_retains_it(fresh, monkeypatch):
    """As a whole call: backward(retain_graph=True) leaves the graph for a second pass (the GAN weight's pattern:
    two gradients through one graph), which adds the same gradients again; after a pass that did not retain it, a
    further one raises and names the way out."""
    monkeypatch.setenv("FAE_BATCH_SPLIT", "split")
    model = tiny_dit().double()
    x, t, y = torch.randn(4, 4, 4, 4, dtype=torch.float64), torch.rand(4), torch.arange(4)
    out = model(x, t, y).sum()  # (a node that saves nothing: the split's own check speaks on the third pass)
    out.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out.backward()
    for name, grad in first.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, 2 * grad, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="FAE_BATCH_SPLIT=whole"):
        out.backward()


def test_a_training_split_that_would_crowd_memory_stays_whole(fresh, monkeypatch):
    """Every part but one holds its own gradient of each parameter until they are summed: where that would take
    more than a quarter of the free memory (here: a machine faked to 4x those bytes, less one), the call stays
    whole and no verdict is measured; at inference nothing is held and the split goes on."""
    monkeypatch.setenv("FAE_BATCH_SPLIT", "split")
    ran = spy_on_parts(monkeypatch)
    model = tiny_dit()
    copy = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # one extra part
    x, t, y = torch.randn(4, 4, 4, 4), torch.rand(4), torch.arange(4)
    monkeypatch.setattr(T, "_free_memory", lambda: 4 * copy - 1)
    model(x, t, y).sum().backward()
    assert ran == []
    with torch.no_grad():
        model(x, t, y)
    assert len(ran) == 2
    monkeypatch.setattr(T, "_free_memory", lambda: 4 * copy)
    model(x, t, y).sum().backward()
    assert len(ran) == 4


def test_hooks_and_one_thread_keep_the_call_whole(fresh, monkeypatch):
    """A hook would see a part, on a worker; one thread has nothing to split over."""
    monkeypatch.setenv("FAE_BATCH_SPLIT", "split")
    ran = spy_on_parts(monkeypatch)
    model = tiny_dit()
    x, t, y = torch.randn(4, 4, 4, 4), torch.rand(4), torch.arange(4)
    seen: list[int] = []
    handle = model.blocks[1].register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    with torch.no_grad():
        model(x, t, y)
    handle.remove()
    assert seen == [4] and ran == []
    torch.set_num_threads(1)
    with torch.no_grad():
        model(x, t, y)
    assert ran == []


class CountingMode(TorchDispatchMode):
    """A dispatch mode that counts the ops it sees (on its own thread only, as every mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_a_mode_in_force_keeps_the_call_whole(fresh, monkeypatch):
    """Dispatch and function modes are per thread: split, a mode would see no part's op. (FlopCounterMode also
    installs global module hooks, so a plain dispatch mode is what tells the two checks apart.)"""
    monkeypatch.setenv("FAE_BATCH_SPLIT", "split")
    ran = spy_on_parts(monkeypatch)
    model = tiny_dit()
    x, t, y = torch.randn(4, 4, 4, 4), torch.rand(4), torch.arange(4)
    counts = []
    for call in (model, functools.partial(unsplit, model)):
        with torch.no_grad(), CountingMode() as mode:
            call(x, t, y)
        counts.append(mode.ops)
    assert ran == [] and counts[0] == counts[1] > 20


def test_the_callers_thread_count_and_the_default_of_new_threads_are_kept(fresh, monkeypatch):
    monkeypatch.setenv("FAE_BATCH_SPLIT", "split")
    ran = spy_on_parts(monkeypatch)
    model = tiny_dit()
    with torch.no_grad():
        model(torch.randn(4, 4, 4, 4), torch.rand(4), torch.arange(4))
    seen: list[int] = []
    fresh_thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh_thread.start()
    fresh_thread.join()
    # the workers run on one thread each, but the caller, and threads started later, keep two
    assert len(ran) == 2 and torch.get_num_threads() == 2 and seen == [2]
    assert T._executor(2).submit(torch.get_num_threads).result() == 1


def test_an_error_in_a_part_reaches_the_caller_and_the_workers_stay_usable(fresh, monkeypatch):
    monkeypatch.setenv("FAE_BATCH_SPLIT", "split")
    ran = spy_on_parts(monkeypatch)
    model = tiny_dit()
    block = model.blocks[0].forward

    def refuses_infinities(h: torch.Tensor, *args: object) -> torch.Tensor:
        if not h.isfinite().all():
            raise FloatingPointError(f"{h.shape[0]} rows with an infinity")
        return block(h, *args)
    monkeypatch.setattr(model.blocks[0], "forward", refuses_infinities)
    x, t, y = torch.randn(4, 4, 4, 4), torch.rand(4), torch.arange(4)
    bad = x.clone()
    bad[3] = float("inf")  # the second part's last sample
    with torch.no_grad(), pytest.raises(FloatingPointError, match="2 rows"):
        model(bad, t, y)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), unsplit(model, x, t, y), rtol=1e-6, atol=1e-6)
    assert len(ran) == 4


def test_a_guided_measurement_that_calls_the_model_does_not_wait_for_itself(fresh, monkeypatch):
    """Timing CFG batching calls the model while this thread holds the machine's verdicts. A split there would
    wait for workers that wait for those verdicts (linears large enough to be timed); the measurement runs on one
    thread, so the model runs whole there, and split afterwards."""
    import fae.transport
    from fae.transport import GuidanceSchedule, GuidedVelocity

    monkeypatch.setenv("FAE_BATCH_SPLIT", "split")
    monkeypatch.setattr(fae.transport, "SMALL_CFG_BATCH", 1)
    ran = spy_on_parts(monkeypatch)
    model = tiny_dit(hidden=128, side=8)  # 8 x 64 rows x 128 x 512: the MLP's products are timed
    x, y = torch.randn(8, 4, 8, 8), torch.arange(8)
    done: list[torch.Tensor] = []

    def guided() -> None:
        with torch.no_grad():
            done.append(GuidedVelocity(model, GuidanceSchedule.constant(2.0))(x, 0.5, y))
    worker = threading.Thread(target=guided, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert done, "the guided call hung"
    assert len(ran) >= 2  # and after the measurement, the guided call itself was split
    assert {v.kind for v in K.verdicts()} >= {"cfg_batch", "linear"}


@pytest.mark.parametrize("grad", [False, True])
def test_the_split_is_measured_on_the_wall_clock_once_per_machine(fresh, monkeypatch, grad):
    """Really timed (no fake): the verdict is measured, written to the machine's file outside the lock, and a later
    process (here: this one after forgetting) reads it instead of timing again. Under autograd the candidates are
    timed with their backward, as a verdict of its own, and leave no gradient behind."""
    monkeypatch.setattr(T, "SMALL_SPLIT", 1)
    model = tiny_dit()
    x, t, y = torch.randn(4, 4, 4, 4), torch.rand(4), torch.arange(4)
    with torch.set_grad_enabled(grad):
        model(x, t, y)
    (verdict,) = [v for v in K.verdicts() if v.kind == "batch_split"]
    assert verdict.source == "measured" and set(verdict.ms) == {"whole", "split"}
    assert verdict.choice == min(verdict.ms, key=verdict.ms.__getitem__)
    assert verdict.key.endswith(" backward") == grad
    assert all(p.grad is None for p in model.parameters())
    K.reset()
    monkeypatch.setattr(K, "measure_wall", lambda *args: pytest.fail("timed again"))
    with torch.set_grad_enabled(grad):
        model(x, t, y)
    (again,) = [v for v in K.verdicts() if v.kind == "batch_split"]
    assert again.source == "cached" and again.choice == verdict.choice
