"""Nothing mtpress starts outlives it; no tool but the release gate's llama-server sees the Hub token; one run
per release folder.

Real processes throughout: a parent is killed with SIGKILL (no ``finally``, no ``atexit``) and what it started
must be gone within seconds; environments are read from ``/proc/<pid>/environ`` of the live child. Each check
is shown failing too: a process started the plain way survives the same kill, and sees the token.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from uuid import uuid4

import pytest
import requests

from mtpress.errors import ReleaseBusyError
from mtpress.fsutil import RUN_LOCK, hold_folder, remove_stale_partials
from mtpress.toolchain import LlamaCpp, run_tool
from mtpress.toolchain.llama_cpp import tool_version
from mtpress.toolchain.server import llama_server

CANARY = f"canary-{uuid4().hex}"
SECRETS = {"HF_TOKEN": CANARY, "MY_API_KEY": CANARY}


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode(errors="replace").split("\0") if "=" in entry)


def children(pid: int) -> list[int]:
    """Every process ``pid`` started, from any of its threads (a child belongs to the thread that forked it)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (OSError, StopIteration):
        return False
    return "zombie" not in state


def survivors(pids: list[int], within: float) -> list[int]:
    deadline = time.monotonic() + within
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def parent(script: str, env: dict | None = None) -> subprocess.Popen:
    """A Python process running ``script`` (its first line of output says it is ready)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_a_tool_dies_with_the_process_that_started_it_even_on_kill_9():
    proc = parent("""
        import subprocess, threading, time
        from mtpress.toolchain import run_tool

        # From a worker thread, as the flow's smoke lane starts its tools; the thread lives while the tool runs.
        threading.Thread(target=run_tool, args=(["sleep", "600"],), kwargs={"timeout": 900}, daemon=True).start()
        plain = subprocess.Popen(["sleep", "601"])  # started the plain way: the control
        print("ready", flush=True)
        time.sleep(600)
    """)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 30
    while not {"sleep 600", "sleep 601"} <= (started := {cmdline(p).strip(): p for p in children(proc.pid)}).keys():
        assert time.monotonic() < deadline, started
        time.sleep(0.05)
    tool, plain = started["sleep 600"], started["sleep 601"]
    try:
        proc.kill()
        proc.wait()
        assert survivors([tool], within=5) == [], "a tool outlived mtpress"
        assert alive(plain), "the control: without the parent-death signal a child survives a kill -9"
    finally:
        os.kill(plain, signal.SIGKILL)


def test_a_tool_on_a_dask_worker_dies_when_the_flow_that_wanted_it_is_killed():
    """The worker outlives the killed client; the scheduler cancels its task, and the tool the task waits on is
    killed rather than left to run to its end. The control: a process the task started the plain way runs on."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as ours:
        [worker] = ours.run(os.getpid).values()
        flow = parent(f"""
            import subprocess
            from distributed import Client
            from mtpress.toolchain import run_tool

            def task():
                subprocess.Popen(["sleep", "601"])  # the control
                return run_tool(["sleep", "600"], timeout=900)

            client = Client({cluster.scheduler_address!r})
            future = client.submit(task, pure=False)
            print("submitted", flush=True)
            future.result()
        """)
        assert flow.stdout.readline().strip() == "submitted"
        deadline = time.monotonic() + 60
        while not {"sleep 600", "sleep 601"} <= (started := {cmdline(p).strip(): p for p in children(worker)}).keys():
            assert time.monotonic() < deadline and flow.poll() is None, started
            time.sleep(0.05)
        tool, plain = started["sleep 600"], started["sleep 601"]
        try:
            flow.kill()
            flow.wait()
            assert survivors([tool], within=10) == [], "a tool outlived the flow on its Dask worker"
            assert alive(plain) and alive(worker), "the control: the worker and a plain child live on"
            assert ours.submit(sum, [1, 2], pure=False).result() == 3  # the worker still serves
        finally:
            for pid in (tool, plain):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


def test_a_download_on_a_dask_worker_stops_when_the_flow_that_wanted_it_is_killed(tmp_path):
    """Dask cannot interrupt a running fetch either: the download checks, as its bytes come, that its task is still
    wanted. The Hub holds the shard's request until the flow is killed and the scheduler has let the task go; of
    the 128 MiB that then stream, the worker takes about a chunk and stops."""
    import numpy as np
    from distributed import Client, LocalCluster
    from safetensors.numpy import save_file

    from mtpress.hub.client import hub_api
    from tests.conftest import client_on_local_hub

    checkpoint = tmp_path / "big"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"architectures": ["Qwen3_5ForCausalLM"]}')
    save_file({"model.embed_tokens.weight": np.zeros((128, 2**20), dtype=np.uint8)}, checkpoint / "model.safetensors")
    size = (checkpoint / "model.safetensors").stat().st_size
    with client_on_local_hub(tmp_path, faults=True) as hub:
        hub_api().create_repo("org/big")
        hub_api().upload_folder(repo_id="org/big", folder_path=checkpoint)
        # The probe's header read is held a moment; the download long enough to kill the flow meanwhile.
        for hold in (1, 15):
            hub.faults.add("GET", r"/org/big/resolve/.*model\.safetensors", action="stall", seconds=hold)
        # The workers start inside the block: they read the local Hub's address from the environment.
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as ours:
            [worker] = ours.run(os.getpid).values()
            flow = parent(f"""
                from pathlib import Path
                from distributed import Client
                from mtpress.schema import Source
                from mtpress.stages.download import fetch

                client = Client({cluster.scheduler_address!r})
                future = client.submit(fetch, Source(repo="org/big"), Path({str(tmp_path / "cache")!r}), pure=False)
                print("submitted", flush=True)
                future.result()
            """)
            assert flow.stdout.readline().strip() == "submitted"
            deadline = time.monotonic() + 60
            while hub.faults.pending():  # the download's request has come: it waits for its bytes
                assert time.monotonic() < deadline and flow.poll() is None
                time.sleep(0.05)
            held_until = time.monotonic() + 15
            probed = hub.bytes_served.get("org/big/model.safetensors", 0)
            flow.kill()
            flow.wait()
            while ours.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
                assert time.monotonic() < held_until - 1, "the scheduler kept the killed flow's task"
                time.sleep(0.05)
            time.sleep(held_until + 4 - time.monotonic())  # the hold ends, the bytes stream
            taken = hub.bytes_served.get("org/big/model.safetensors", 0) - probed
            assert taken < size // 4, f"the worker went on downloading for a killed flow: {taken:,d} of {size:,d}"
            assert not list((tmp_path / "cache").rglob("snapshots/*/model.safetensors"))
            assert alive(worker) and ours.submit(sum, [1, 2], pure=False).result() == 3  # the worker still serves


SERVER = """
    import sys, time
    from contextlib import nullcontext

    if sys.argv[1] == "mtpress":
        from mtpress.toolchain.prefect_server import prefect_api
        api = prefect_api()
    else:  # the control: the temporary server Prefect starts by itself without PREFECT_API_URL
        from prefect.server.api.server import SubprocessASGIServer
        server = SubprocessASGIServer()
        server.start()
        api = nullcontext(server.api_url)
    with api as url:
        print(url, flush=True)
        time.sleep(600)
"""


def test_the_prefect_server_dies_with_mtpress_and_never_sees_the_token(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, **SECRETS,
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    starters, servers = [], []

    def serve(who: str) -> str:
        starters.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(SERVER), who], stdout=subprocess.PIPE,
                                         text=True, env=env))
        url = starters[-1].stdout.readline().strip()
        servers.extend(children(starters[-1].pid))
        return url

    try:
        # One after the other: the first creates the database, the second finds it made.
        url = serve("mtpress")
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        [server] = servers
        assert "uvicorn" in cmdline(server)
        assert CANARY not in environ(server).values()
        assert environ(server)["PREFECT_HOME"] == env["PREFECT_HOME"], "Prefect's settings reach its server"
        serve("prefect")
        control = servers[1]
        assert environ(control)["HF_TOKEN"] == CANARY, "the control: Prefect's own server gets the whole environment"

        for proc in starters:
            proc.kill()
            proc.wait()
        assert survivors([server], within=5) == [], "Prefect's server outlived mtpress"
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/health", timeout=10)
        assert alive(control), "the control: Prefect's own temporary server survives a kill -9 of its starter"
    finally:
        for proc in starters:
            proc.kill()
            proc.wait()
        for pid in servers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_configured_prefect_api_is_used_as_it_is():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from mtpress.toolchain.prefect_server import prefect_api

    before = children(os.getpid())  # the test harness's server, when another test started it
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}), prefect_api() as url:
        assert url == "http://127.0.0.1:9/api"
        assert children(os.getpid()) == before, "no server started"


def test_run_tool_and_the_version_probes_get_no_secret(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    assert CANARY in subprocess.run(["cat", "/proc/self/environ"], capture_output=True, text=True).stdout, \
        "the control: a process started the plain way sees the token"
    assert CANARY not in run_tool(["cat", "/proc/self/environ"], timeout=60)

    # The probes run fixed programs; stand-ins at their paths record the environment they were given.
    probe = "#!/bin/sh\ntr '\\0' '\\n' < /proc/$$/environ > \"$0.environ\"\necho '{}'\n"
    (tmp_path / "llama-server").write_text(probe.format("version: 0.6.0-dev (build 11434, commit 0)"))
    (tmp_path / "python").write_text(probe.format("3.11.7 2.13.0 4.57.6"))
    for stand_in in ("llama-server", "python"):
        (tmp_path / stand_in).chmod(0o755)
    assert tool_version(tmp_path) == "11434"
    tools = LlamaCpp(tmp_path, tmp_path, tmp_path / "python", "11434", "user")
    assert tools.describe()["converter_python"] == "3.11.7 2.13.0 4.57.6"
    for stand_in in ("llama-server", "python"):
        seen = (tmp_path / f"{stand_in}.environ").read_text()
        assert "PATH=" in seen and CANARY not in seen, stand_in


def test_only_a_server_given_the_token_has_it(toolchain, demo_ggufs, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    model = ["-m", str(demo_ggufs[1].path), "-c", "512"]
    with llama_server(toolchain, model, timeout=120) as server:  # smoke, bench, realign: no token
        assert CANARY not in environ(server.pid).values()
    # The release gate's: llama.cpp's -hf reads the private staging repo with it, from its environment.
    with llama_server(toolchain, model, timeout=120, env={"HF_TOKEN": CANARY}) as server:
        seen = environ(server.pid)
        assert seen["HF_TOKEN"] == CANARY and "MY_API_KEY" not in seen


HOLDER = """
    import sys, time
    from pathlib import Path
    from mtpress.fsutil import hold_folder

    hold_folder(Path(sys.argv[1]))
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_release_folder_held_by_a_run_refuses_a_second_until_the_first_is_killed(tmp_path):
    folder = tmp_path / "releases" / "X"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(folder)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(ReleaseBusyError) as busy:
            hold_folder(folder)
        assert time.monotonic() - started < 1, "a second run fails at once, it does not wait"
        assert f"{folder} is in use by another mtpress run (pid {holder.pid}, since " in str(busy.value)
        assert "wait for that run to end" in str(busy.value)
    finally:
        holder.kill()
        holder.wait()
    hold_folder(folder)  # the kernel released the killed run's lock
    hold_folder(folder)  # and runs of one folder in one process follow each other
    assert f"pid {os.getpid()}, " in (folder / RUN_LOCK).read_text()


def test_a_rerun_removes_what_a_killed_run_left_and_nothing_else(tmp_path):
    release, work = tmp_path / "X", tmp_path / ".work-X"
    stale = [release / ".X-Q4_K_M.gguf.4242.partial", release / "sidecar" / ".convert-abc",
             work / "gate" / "gate-llama-cache-k2j.partial", work / "gate" / "gate-snapshot-9x.partial",
             work / "realigned" / ".head.trainer-1.partial"]
    kept = [release / "X-Q4_K_M.gguf", release / ".mtpress-cache" / "smoke-1.json", release / RUN_LOCK,
            work / "hub-cache" / "models--a--b" / "blobs" / "0a1b", work / "injected" / "model.safetensors"]
    for path in [*stale[1:], *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
    for path in kept + stale[:1]:
        path.write_bytes(b"x")
    for folder in stale[1:]:
        folder.mkdir()
        (folder / "models--x" / "snapshots").mkdir(parents=True)
        (folder / "models--x" / "snapshots" / "part.gguf.partial").write_bytes(b"x")

    removed = remove_stale_partials(release) + remove_stale_partials(work)
    assert sorted(removed) == sorted(stale), "each leftover once, not what lies inside it"
    assert not any(p.exists() for p in stale)
    assert all(p.is_file() for p in kept)


TERMINATION = (signal.SIGTERM, signal.SIGINT)


@pytest.fixture
def handlers_put_back():
    """The test sets SIGTERM's and SIGINT's handlers as it needs; they are put back as they were afterwards."""
    before = {signum: signal.getsignal(signum) for signum in TERMINATION}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


def test_termination_handlers_are_armed_once_per_process_and_chain_to_the_previous_ones(handlers_put_back):
    """A worker serving many runs arms the handlers at each run: they must not pile up, and each hands on to
    what was there before (Prefect's, or Python's own Ctrl-C)."""
    from mtpress.toolchain.processes import stop_tools_on_termination

    # Python's own Ctrl-C, whatever this test runner inherited (started in the background, it ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop_tools_on_termination()
    armed = {signum: signal.getsignal(signum) for signum in TERMINATION}
    stop_tools_on_termination()
    assert {signum: signal.getsignal(signum) for signum in TERMINATION} == armed
    assert all(getattr(handler, "stops_tools", False) for handler in armed.values())
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C still interrupts, after stopping the tools
        armed[signal.SIGINT](signal.SIGINT, None)


def test_a_signal_the_process_ignores_stays_ignored(handlers_put_back):
    """A job a script started in the background ignores SIGINT: a Ctrl-C meant for the script must not stop its
    tools halfway through a task."""
    from mtpress.toolchain.processes import stop_tools_on_termination

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stop_tools_on_termination()
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert getattr(signal.getsignal(signal.SIGTERM), "stops_tools", False)
