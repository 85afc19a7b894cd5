"""Multi-node: two torchrun "nodes" on this machine (`--nnodes 2 --nproc-per-node 1`, c10d rendezvous on localhost,
gloo) train the tiny DiT of tests/test_scale.py. One node is SIGKILLed (its torchrun agent and its worker, like a
machine losing power) after the step-2 checkpoint; the survivor fails at its next collective; the same command on
both nodes then resumes from that checkpoint. The result equals an uninterrupted two-process run bit for bit, and the
one-process run at the same global batch within tests/test_scale.py's tolerance. Run folders that are not one shared
folder are refused at resume by name (docs/scaling.md, "Multi-node").

Run as a script (by torchrun), this file is the worker: it trains in the run folder given as its argument and saves
its final weights there as rank<R>.pt."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

KILL_ENV = "FAE_TEST_KILL_NODE"   # "RANK:STEP": the worker of global rank RANK kills its node in step index STEP
PIDS_ENV = "FAE_TEST_PIDS"        # a folder where each worker leaves its pid (it runs in a session of its own)
CFG = dict(checkpoint_every=2)     # on top of tests/test_scale.py's config: 4 steps, global batch 8, grad_accum 2


# ------------------------------------------------------------------------------------------------------- the worker
def _kill_this_node() -> None:
    """SIGKILL this node: its torchrun agent's process group (the test starts each agent as a session leader) and
    this worker (torchrun starts each worker in a session of its own)."""
    agent = os.getppid()
    if agent > 1 and os.getpgid(agent) == agent:   # the agent, not whatever adopted an orphan
        os.killpg(agent, signal.SIGKILL)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def worker(out: Path) -> None:
    import test_scale

    from fae import distributed as D

    (Path(os.environ[PIDS_ENV]) / str(os.getpid())).touch()
    kill_rank, kill_step = (int(v) for v in os.environ.get(KILL_ENV, "-1:-1").split(":"))

    class Killed(test_scale.TinyDiT):
        def loss(self, group, batch, step):
            if step == kill_step and D.rank() == kill_rank:
                _kill_this_node()
            return super().loss(group, batch, step)

    test_scale.TinyDiT = Killed   # the stage test_scale._train builds (this process only)
    result = test_scale._train(out, None, **CFG)
    torch.save(result, out / f"rank{D.rank()}.pt")


# --------------------------------------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_nodes(out: Path, logs: Path, pids: Path, **env: str) -> list[subprocess.Popen]:
    """The same torchrun command twice, as the two nodes of one job, each node a session (process group) of its own."""
    from seeding import subprocess_env

    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "fae-multinode",
               "--local-addr", "127.0.0.1", "--max-restarts", "0", "--monitor-interval", "0.1",
               str(Path(__file__).resolve()), str(out)]
    # nothing of an enclosing torchrun job leaks in; one thread per worker (bitwise comparisons, 2 shared cores)
    clean = {k: v for k, v in subprocess_env().items()
             if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                          "GROUP_RANK", "ROLE_RANK", KILL_ENV} and not k.startswith("TORCHELASTIC_")}
    clean.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", **{PIDS_ENV: str(pids)}, **env)
    nodes = []
    for node in (0, 1):
        with open(logs / f"node{node}.log", "ab") as log:   # the child keeps its own descriptor
            nodes.append(subprocess.Popen(command, env=clean, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
    return nodes


def _wait(nodes: list[subprocess.Popen], seconds: float) -> list[int | None]:
    """The nodes' exit codes after at most `seconds` (None: still running)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(p.poll() is None for p in nodes):
        time.sleep(0.05)
    return [p.poll() for p in nodes]


def _end(nodes: list[subprocess.Popen], pids: Path, marker: Path) -> None:
    """SIGKILL what is left of the nodes: each running agent's process group, and each worker's session (their ids
    are in `pids`) whose command line holds `marker` (the run folder), so that an id reused meanwhile is left alone."""
    for p in nodes:
        if p.poll() is None:   # not reaped: the id is still this agent's
            os.killpg(p.pid, signal.SIGKILL)
    for f in pids.glob("*"):
        try:
            if str(marker).encode() in Path(f"/proc/{f.name}/cmdline").read_bytes():
                os.killpg(int(f.name), signal.SIGKILL)
        except OSError:   # gone already (ProcessLookupError is an OSError)
            pass
        f.unlink()
    for p in nodes:
        p.wait(timeout=30)


def _logs(logs: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(logs.glob("*.log")))


def _steps(out: Path) -> list[int]:
    from fae.io import checkpoint_dirs

    return [int(p.name.split("_")[1]) for p in checkpoint_dirs(out)]


def _train_one_thread(out: Path, stop_at: int | None) -> dict[str, torch.Tensor]:
    """test_scale._train in this process on one thread, as each worker runs (thread counts round GEMMs differently)."""
    from test_scale import _train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(out, stop_at, **CFG)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------- tests
def test_two_nodes_killed_and_resumed_train_as_one_process(tmp_path):
    from test_scale import _assert_same, _two_processes

    out, logs, pids = tmp_path / "run", tmp_path / "logs", tmp_path / "pids"
    for folder in (out, logs, pids):
        folder.mkdir()
    nodes: list[subprocess.Popen] = []
    try:
        # the node holding rank 1 dies in step index 2 (the third step), after step 2's checkpoint was written
        nodes = _launch_nodes(out, logs, pids, **{KILL_ENV: "1:2"})
        codes = _wait(nodes, 120)
        assert -signal.SIGKILL in codes, f"no node was killed: exit codes {codes}\n{_logs(logs)}"
        survivor = _wait([nodes[1 - codes.index(-signal.SIGKILL)]], 60)[0]
        assert survivor not in (None, 0), f"the other node {'hung' if survivor is None else 'finished'}\n{_logs(logs)}"
        _end(nodes, pids, out)
        assert _steps(out) == [2] and not list(out.glob("rank*.pt")), _logs(logs)

        nodes = _launch_nodes(out, logs, pids)   # the same command on both nodes again
        codes = _wait(nodes, 120)
        assert codes == [0, 0], f"the resumed nodes exited with {codes}\n{_logs(logs)}"
    finally:
        _end(nodes, pids, out)
    assert _steps(out) == [2, 4]
    # resumed at step 2, not started afresh (that would log steps 1 and 2 twice)
    assert [json.loads(row)["step"] for row in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for k, v in ranks[0].items():   # DDP replicas apply the same all-reduced gradient: identical
        assert torch.equal(v, ranks[1][k]), k

    # the kill lost nothing: an uninterrupted two-process run (forked here, one thread each) gives the same bits
    straight = _two_processes(tmp_path / "straight", **CFG)[0]
    assert straight.keys() == ranks[0].keys()
    for k, v in straight.items():
        assert torch.equal(v, ranks[0][k]), k
    # and one process at the same global batch the same weights, up to the summation order of the all-reduce
    _assert_same(ranks[0], _train_one_thread(tmp_path / "single", None), "two nodes vs one process")


def _rank_in_its_folder(rank: int, port: int, outs: list[Path], errors: Path) -> None:
    """One process of a two-process job whose run folder is `outs[rank]`; what it raised goes to `errors`."""
    from test_scale import _train

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        _train(outs[rank], None, **CFG)
    except BaseException as exc:
        (errors / f"rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    finally:
        os._exit(0)   # no exit-time teardown in a forked child (tests/test_scale.py)


def test_node_local_run_folders_are_refused_at_resume(tmp_path):
    """Two "nodes" that each see their own run folder (a node-local disk each): rank 0's holds a checkpoint, rank 1's
    none. Both stop with an error that names the cause, before a collective of the resume could mismatch and hang."""
    import torch._dynamo  # noqa: F401  (imported once before the fork, as in tests/test_scale.py)

    outs, errors = [tmp_path / "node0", tmp_path / "node1"], tmp_path / "errors"
    _train_one_thread(outs[0], 2)
    outs[1].mkdir()
    errors.mkdir()
    port = _free_port()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_in_its_folder, args=(rank, port, outs, errors)) for rank in (0, 1)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 60   # without the check the two hang in mismatched collectives
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    for rank in (0, 1):
        said = (errors / f"rank{rank}.txt").read_text() if (errors / f"rank{rank}.txt").is_file() else "nothing"
        assert said.startswith("TrainingError: the processes see different checkpoints") and \
            "['step_00000002', 'none']" in said and "shared file system" in said, f"rank {rank}: {said}"
    assert _steps(outs[0]) == [2] and not (outs[1] / "checkpoints").exists()   # neither trained on


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
