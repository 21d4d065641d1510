"""`python -m shmgrpc.tools.bench`, the command behind the README's numbers, run
for real (its own server processes, every mode over a real socket) on tiny
plans: every reply checked, the offloaded sizes really offloaded by both
processes, the inline ones not, grpc-unix-md reported beside them; and every
api (sync and grpc.aio clients and servers, crossed) in every shape, with
the CPU time of both processes beside each time."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from shmgrpc.tools import bench
from tests.conftest import ROOT, child_env

KiB = 1024


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "shmgrpc.tools.bench", "--messages", "bytes", "--sizes", "4KiB,256KiB",
         "--shapes", "unary,server_stream", "--modes", "grpc-unix,grpc-unix-md,memfd,shm", "--apis", "sync",
         "--repeat", "1", "--stream-bytes", "1MiB", "--out", str(out)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((out / "results.json").read_text()), (out / "report.txt").read_text()


def _cells(data):
    return {(c["shape"], c["size"], c["mode"]): c for c in data["cells"]}


def test_every_cell_ran_and_every_reply_was_checked(results):
    data, _ = results
    cells = _cells(data)
    assert len(cells) == 2 * 2 * 4
    for key, cell in cells.items():
        assert cell["errors"] == [] and cell["fast_path_shortfalls"] == [], key
        assert cell["checked_whole"] > 0 and cell["median_ms"] > 0, key
        # Small messages get more, shorter samples (their cells measure a few percent).
        assert len(cell["samples_ms"]) == (bench.SMALL_ROUNDS if key[1] <= bench.SMALL_MESSAGE else 1), key


def test_large_messages_take_the_fast_path_and_small_ones_do_not(results):
    data, _ = results
    for (shape, size, mode), cell in _cells(data).items():
        client, server = cell["client_shmgrpc_stats"], cell["server_shmgrpc_stats"]
        offloaded = client["by_transport"].get(mode, {}).get("offloaded", {}).get("count", 0) + \
            server["by_transport"].get(mode, {}).get("offloaded", {}).get("count", 0)
        if mode in bench.SHMGRPC_MODES and size >= 256 * KiB:
            assert offloaded > 0, (shape, size, mode)
        else:
            assert client["offloaded"]["count"] == 0 and server["offloaded"]["count"] == 0, (shape, size, mode)


def test_the_metadata_mode_is_measured_beside_the_others(results):
    _, report = results
    assert "grpc-unix-md" in report
    assert f"median of 1 interleaved rounds ({bench.SMALL_ROUNDS} for messages of 64 KiB and less)" in report
    assert "4 KiB, below the" in report and "grpc-unix-md " in report.split("4 KiB, below the", 1)[1]
    # What the mode sends: each call of its multicallables carries HELLO_LIKE.
    seen = []

    class Channel:
        def unary_unary(self, method, **kwargs):
            return lambda request, **call: seen.append(call)

    bench._WithMetadata(Channel()).unary_unary("/m")(b"", timeout=1)
    assert seen == [{"metadata": (bench.HELLO_LIKE,), "timeout": 1}]
    assert len(bench.HELLO_LIKE[1]) == 190
    assert "grpc-unix-md" not in bench.DEFAULT_MODES


def test_the_speedup_plot_draws_each_transport_against_plain_grpc(results, tmp_path):
    data, _ = results
    view = bench.Results(data)
    lines = bench.speedup_lines([("", view)], "bytes", "unary")
    assert sorted(lines) == [("sync", "default", "memfd"), ("sync", "default", "shm")]
    for (api, _, mode), points in lines.items():
        assert [size for size, _ in points] == [4 * KiB, 256 * KiB]
        for size, speedup in points:
            assert speedup == pytest.approx(view.per_message("bytes", "unary", size, "grpc-unix", api)
                                            / view.per_message("bytes", "unary", size, mode, api))
    pytest.importorskip("matplotlib")
    assert bench.write_plots(str(tmp_path), [("", view)]) == []
    assert (tmp_path / "speedup.png").stat().st_size > 0 and (tmp_path / "throughput.png").stat().st_size > 0


@pytest.fixture(scope="module")
def api_results(tmp_path_factory):
    """One offloaded size, every shape, plain and memfd, in each api."""
    out = tmp_path_factory.mktemp("bench-apis")
    proc = subprocess.run(
        [sys.executable, "-m", "shmgrpc.tools.bench", "--messages", "bytes", "--sizes", "256KiB",
         "--shapes", ",".join(bench.SHAPES), "--modes", "grpc-unix,memfd", "--apis", ",".join(bench.APIS),
         "--repeat", "1", "--stream-bytes", "1MiB", "--out", str(out)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((out / "results.json").read_text()), (out / "report.txt").read_text()


def _moved(stats, transport, what):
    return stats["by_transport"].get(transport, {}).get(what, {}).get("count", 0)


def test_every_api_runs_every_shape_with_cpu_time_beside_each_time(api_results):
    data, report = api_results
    cells = {(c["api"], c["shape"], c["mode"]): c for c in data["cells"]}
    assert len(cells) == len(bench.APIS) * len(bench.SHAPES) * 2
    for (api, shape, mode), cell in cells.items():
        key = (api, shape, mode)
        assert (cell["client_api"], cell["server_api"]) == bench.sides(api), key
        assert cell["errors"] == [] and cell["fast_path_shortfalls"] == [], key
        assert cell["checked_whole"] > 0 and cell["per_message_ms"] > 0, key
        assert cell["client_cpu_per_message_ms"] > 0 and cell["server_cpu_per_message_ms"] > 0, key
        assert cell["cpu_per_message_ms"] > 0 and cell["cpu_ratio_to_grpc-unix"] > 0, key
        assert len(cell["client_cpu_samples_ms"]) == len(cell["server_cpu_samples_ms"]) == 1, key
        if mode == "memfd":
            # Offloaded through memfd, each way the payload goes, by both processes.
            client, server = cell["client_shmgrpc_stats"], cell["server_shmgrpc_stats"]
            up = cell["count"] if shape in bench.PAYLOAD_UP else 0
            down = cell["count"] if shape in bench.PAYLOAD_DOWN else 0
            assert _moved(client, "memfd", "offloaded") >= up and _moved(server, "memfd", "restored") >= up, key
            assert _moved(server, "memfd", "offloaded") >= down and _moved(client, "memfd", "restored") >= down, key
        else:
            assert cell["client_shmgrpc_stats"]["offloaded"]["count"] == 0, key
            assert cell["server_shmgrpc_stats"]["offloaded"]["count"] == 0, key
    assert data["options"]["apis"] == list(bench.APIS)
    for api in bench.APIS:
        assert f"api {api}: {bench.API_TITLES[api]}" in report
    assert "vs sync" in report and "cpu client" in report and "sum/grpc-unix" in report


def test_no_cma_shortfall_below_its_own_threshold():
    config = SimpleNamespace(threshold=128 * KiB, cma_threshold=512 * KiB)
    assert bench.Bench.fast_path_from(config, "cma") == 512 * KiB
    assert bench.Bench.fast_path_from(config, "shm") == 128 * KiB
