"""scripts/benchmark.py's measurements, on tiny process trees whose costs are known in advance."""

import importlib.util
import os
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import TEST_TOKEN

MB = 1_000_000
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_a_tree_is_measured_whole_children_and_grandchildren_included(benchmark, tmp_path):
    # The parent holds 60 MB of its own memory and writes 8 MB; a grandchild writes 12 MB and burns CPU;
    # a shell grandchild writes 6 MB; the parent writes 5 MB more and exits.
    grandchild = f"""
        import os, subprocess, sys, time
        open({str(tmp_path / "g")!r}, "wb").write(os.urandom(12 * {MB}))
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
        """
    child = f"""
        import os, subprocess, sys
        held = bytearray(os.urandom(60 * {MB}))
        open({str(tmp_path / "a")!r}, "wb").write(os.urandom(8 * {MB}))
        subprocess.run({python(grandchild)!r}, check=True)
        subprocess.run(["sh", "-c", "sleep 0.6; head -c {6 * MB} /dev/urandom > {tmp_path / 'q'}"], check=True)
        open({str(tmp_path / "b")!r}, "wb").write(os.urandom(5 * {MB}))
        """
    usage = benchmark.measure([sys.executable, "-c", textwrap.dedent(child)], log=tmp_path / "logs" / "t.log")
    assert usage.wall_s >= 1.0
    assert usage.cpu_s >= 0.3
    assert 60 * MB <= usage.peak_anon <= usage.peak_rss
    assert 31 * MB <= usage.written < 40 * MB
    assert usage.uploaded == 0


def test_a_failing_command_stops_the_benchmark_with_its_output(benchmark, tmp_path):
    with pytest.raises(SystemExit) as stop:
        benchmark.measure(python("print('converter said no'); raise SystemExit(3)"), log=tmp_path / "x.log")
    assert "exit code 3" in str(stop.value) and "converter said no" in str(stop.value)


def test_uploaded_bytes_are_what_the_local_hub_received(benchmark, tmp_path, local_hub):
    payload = tmp_path / "weights.bin"
    payload.write_bytes(os.urandom(3 * MB))
    upload = f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("bench/tiny")
        api.upload_file(path_or_fileobj={str(payload)!r}, path_in_repo="weights.bin", repo_id="bench/tiny")
        """
    env = {"HF_ENDPOINT": local_hub.url, "HF_TOKEN": TEST_TOKEN, "HF_HUB_DISABLE_XET": "1"}
    first = benchmark.measure(python(upload.replace("create_repo(", "create_repo(exist_ok=True, repo_id=")),
                              log=tmp_path / "up.log", env=env, hub=local_hub)
    assert 3 * MB <= first.uploaded < 3 * MB + 100_000
    again = benchmark.measure(python(upload.replace("create_repo(", "create_repo(exist_ok=True, repo_id=")),
                              log=tmp_path / "up2.log", env=env, hub=local_hub)
    assert again.uploaded < 100_000  # the Hub has the content: only the JSON of the batch and commit calls


def test_stored_bytes_count_each_file_once(benchmark, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x" * 1000)
    os.link(tmp_path / "d" / "a", tmp_path / "d" / "hard")
    (tmp_path / "d" / "soft").symlink_to(tmp_path / "d" / "a")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "b").write_bytes(b"y" * 24)
    assert benchmark.stored_bytes(tmp_path / "d") == 1024


def test_the_report_computes_the_ratios_and_judges_each_target(benchmark):
    def run(wall, written, uploaded=0, anon=100 * MB):
        return {"wall_s": wall, "cpu_s": wall, "peak_rss": 2 * anon, "peak_anon": anon, "written": written,
                "uploaded": uploaded}

    def result(size, model_bytes, anon):
        return {"size": size, "quants": ["Q4_K_M"], "model_bytes": model_bytes, "identical_ggufs": 0,
                "runs": {"a": run(1000, 9000 * MB, 5000 * MB), "b": run(400, 5000 * MB, 3000 * MB, anon=anon),
                         "c": run(30, 10 * MB), "d": run(35, 10 * MB, uploaded=200_000)},
                "hand": {"download": 2000 * MB, "bf16": 1500 * MB, "quantized": 5000 * MB},
                "mtpress": {"download": 1600 * MB, "bf16": 1500 * MB, "quantized": 1900 * MB}}

    text = benchmark.report([result("demo", 300 * MB, 700 * MB), result("large", 1700 * MB, 800 * MB)])
    assert "(b)/(a): wall 0.40" in text and "(c)/(b): wall 0.075" in text
    # mtpress: 5000 written − 1600 downloaded − 1900 quantized − 10 that a card change rewrites, over 1500 of BF16
    assert "mtpress 0.993 (" in text and "hand recipe merge+convert 1.333 (" in text
    assert "PASS  inject+convert writes ≤ 1.05 × BF16 GGUFs (large): 0.993" in text
    assert "FAIL  peak RssAnon ≤ 0.25 × model size (large): 0.47" in text
    assert "PASS  peak RssAnon growth per model byte, demo → large: 0.071" in text
    assert "FAIL  no-op rerun ≤ 5% of the cold run (large): 7.5%" in text
    assert "PASS  card-only change uploads < 1 MB: 0.20 MB" in text
    assert "PASS  end-to-end ≤ 0.5 × the hand recipe (large): 0.40" in text


def test_memory_cpu_and_disk_are_attributed_to_the_program_of_the_tree(benchmark, tmp_path):
    # A child whose command line names llama-quantize holds 50 MB, burns 0.3 s of CPU and keeps a 20 MB file
    # on the measured disk for 2.5 s (DISK_EVERY samples apart is 2 s), then deletes it.
    disk = tmp_path / "disk"
    disk.mkdir()
    quantize = f"""
        import os, sys, time
        held = bytearray(os.urandom(50 * {MB}))
        open({str(disk / "q.gguf")!r}, "wb").write(os.urandom(20 * {MB}))
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
        time.sleep(2.5)
        os.remove({str(disk / "q.gguf")!r})
        """
    # The name is joined at run time so that only the child's command line holds it.
    parent = f"import subprocess; subprocess.run({python(quantize)!r} + ['llama-' + 'quantize'], check=True)"
    usage = benchmark.measure(python(parent), log=tmp_path / "logs" / "p.log", disk=(disk, tmp_path / "logs"),
                              own=(disk,))
    assert usage.programs["quantize"]["peak_anon"] >= 50 * MB
    assert usage.programs["quantize"]["cpu_s"] >= 0.3
    assert usage.programs["python and the rest"]["peak_anon"] < 50 * MB
    assert 20 * MB <= usage.peak_disk < 21 * MB and benchmark.stored_bytes(disk) == 0
    assert 20 * MB <= usage.peak_own <= usage.peak_disk  # the own folders alone: the log folder left out


def test_the_rehearsal_report_lists_each_run_and_program(benchmark):
    usage = {"wall_s": 540.0, "cpu_s": 125.0, "peak_rss": 2500 * MB, "peak_anon": 2400 * MB, "written": 6300 * MB,
             "uploaded": 0, "peak_disk": 6280 * MB, "peak_own": 3100 * MB,
             "programs": {"convert": {"peak_anon": 900 * MB, "cpu_s": 80.0}}}
    sizes = {"downloaded": 5800 * MB, "bf16": 6280 * MB, "quantized": 5100 * MB}
    text = benchmark.rehearsal_report([{
        "label": "9b × 4 layers", "layers": 4, "model_bytes": 6280 * MB, "quants": ["Q8_0", "Q4_K_M"],
        "layouts": ["sidecar"], "seed_hub_s": {"bounded": 100.0}, "runs": {"generate": usage, "publish bounded": usage},
        "sizes": {"bounded": sizes}, "stage_seconds": {"bounded": {"convert": 300, "quantize": 400}}}])
    assert "9b × 4 layers: pair 6.28 GB" in text and "sidecar; quants Q8_0, Q4_K_M" in text
    assert "  publish bounded     540.0    125.0      2.40 GB    6.28 GB    3.10 GB    6.30 GB    0.00 MB" in text
    assert "convert                CPU     80.0 s, peak RssAnon 0.90 GB" in text
    assert ("bounded: downloaded 5.80 GB, BF16 GGUFs 6.28 GB, quantized 5.10 GB; seconds per stage: convert 300, "
            "quantize 400") in text
