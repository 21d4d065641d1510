"""The package as users get it: sdist and wheel built with `python -m build`
(once for the module), their contents, `twine check --strict` on both (what
the package index would say), the README's links as the index shows them,
the wheel installed into a fresh virtualenv (`python -m shmgrpc doctor`, the
bench and the `shmgrpc` script run from it), and `mypy --strict` on a small
program that uses the public API.

The fresh virtualenv has no pip and no packages of its own: the wheel goes
in with this environment's pip (--no-deps), and grpcio/protobuf come from this
environment's site-packages through a .pth file (it adds the directory to
sys.path but does not run the .pth files in it, so the project's editable
install stays out)."""

from __future__ import annotations

import email
import json
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from typing import Dict

import pytest

import shmgrpc
from shmgrpc import wire
from tests.conftest import ROOT

pytest.importorskip("build", reason="`build` is not installed (pip install -e '.[dev]')")


def run(*args: str, cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Dict[str, Path]:
    """The sdist and the wheel (built from the sdist, as `build` does)."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT), cwd=out)
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(out.iterdir())
    return {"sdist": sdists[0], "wheel": wheels[0]}


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel installed; returns its directory."""
    home = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", "--without-pip", str(home), cwd=home)
    python = home / "bin" / "python"
    purelib = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=home)
    (Path(purelib.stdout.strip()) / "shmgrpc-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--no-cache-dir",
        "--disable-pip-version-check", "--quiet", str(dist["wheel"]), cwd=home)
    return home


def test_version_is_one_and_the_same():
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^version = "([^"]+)"', text, re.MULTILINE)
    assert match and match.group(1) == shmgrpc.__version__
    assert 'license = "Apache-2.0"' in text
    assert re.search(r'requires = \["setuptools>=(\d+)', text) and \
        int(re.search(r'requires = \["setuptools>=(\d+)', text).group(1)) >= 77  # SPDX license expressions
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text


def test_version_is_the_changelogs_top_section():
    """The top section of CHANGELOG.md is the version being made: "0.3.0
    (unreleased)" while _version says 0.3.0.devN (or a pre-release), "0.3.0"
    once it says 0.3.0."""
    heading = re.search(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert heading, "CHANGELOG.md has no '## VERSION' section"
    version = re.fullmatch(r"(\d+\.\d+\.\d+)((?:a|b|rc|\.dev)\d+)?", shmgrpc.__version__)
    assert version, f"{shmgrpc.__version__!r} is not a PEP 440 release, pre-release or dev version"
    release, suffix = version.groups()
    assert heading.group(1) == (f"{release} (unreleased)" if suffix else release), \
        f"CHANGELOG.md's top section is {heading.group(1)!r}; _version.py says {shmgrpc.__version__}"


def test_classifiers_name_every_supported_python():
    text = (ROOT / "pyproject.toml").read_text()
    least = re.search(r'^requires-python = ">=3\.(\d+)"', text, re.MULTILINE)
    assert least, "requires-python is not '>=3.N'"
    listed = {int(n) for n in re.findall(r'"Programming Language :: Python :: 3\.(\d+)"', text)}
    assert listed and min(listed) == int(least.group(1)), (least.group(0), sorted(listed))
    assert listed == set(range(min(listed), max(listed) + 1)), sorted(listed)  # no gaps


def test_changelog_states_wire_compatibility():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## 0.2.0" in text
    assert wire.VERSION == "2" and 'version **"2"**' in text
    assert wire.PREFIX == bytes.fromhex("07fe5347") and "07 fe 53 47" in text
    assert wire.KIND_MEMFD == 3 and "**3 memfd**" in text
    assert "do not interoperate" in text and "plain gRPC" in text


def test_wheel_contents(dist):
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = set(whl.namelist())
        info = f"shmgrpc-{shmgrpc.__version__}.dist-info"
        metadata = email.message_from_string(whl.read(f"{info}/METADATA").decode())
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    for name in ("__init__.py", "__main__.py", "py.typed", "tools/cli.py", "tools/doctor.py", "tools/bench.py",
                 "_types.py", "transports/__init__.py", "transports/memfd.py", "transports/shm.py",
                 "transports/cma.py", "transports/_layout.py", "transports/_pool.py", "transports/_attacher.py",
                 "transports/_slots.py", "aio/__init__.py", "metrics/__init__.py", "metrics/prometheus.py",
                 "metrics/otel.py"):
        assert f"shmgrpc/{name}" in names, name
    assert f"{info}/licenses/LICENSE" in names
    assert not [n for n in names if n.startswith(("tests/", "protos/", "server_example/", "client_example/"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert metadata["Name"] == "shmgrpc" and metadata["Version"] == shmgrpc.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert sorted(d for d in metadata.get_all("Requires-Dist") if "extra ==" not in d) == \
        ["grpcio>=1.50", "protobuf>=4.21"]  # runtime dependencies: these two only
    assert {"prometheus", "otel"} <= set(metadata.get_all("Provides-Extra"))
    classifiers = metadata.get_all("Classifier")
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers and "Typing :: Typed" in classifiers
    urls = metadata.get_all("Project-URL")
    assert any(u.startswith("Homepage, https://github.com/shmgrpc/shmgrpc") for u in urls)
    assert re.search(r"^shmgrpc = shmgrpc\.tools\.cli:main$", entry_points, re.MULTILINE)
    assert "pip install shmgrpc" in metadata.get_payload()  # the README is the long description


def test_sdist_contents(dist):
    with tarfile.open(dist["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "Makefile", "docs/DESIGN.md",
                 "shmgrpc/py.typed", "shmgrpc/tools/cli.py", "tests/conftest.py", "protos/echo_test.proto",
                 "server_example/__main__.py", "client_example/__main__.py"):
        assert name in names, name
    assert not [n for n in names if "__pycache__" in n or re.search(r"_pb2(_grpc)?\.py$", n)]


def test_twine_check_strict(dist):
    """What the package index would say of the metadata and the README
    (rendered as the long description), warnings counted as errors."""
    pytest.importorskip("twine", reason="twine is not installed (pip install -e '.[dev]')")
    done = run(sys.executable, "-m", "twine", "check", "--strict", str(dist["sdist"]), str(dist["wheel"]),
               cwd=dist["sdist"].parent)
    assert done.stdout.count("PASSED") == 2, done.stdout


REPOSITORY = "https://github.com/shmgrpc/shmgrpc"
RAW = "https://raw.githubusercontent.com/shmgrpc/shmgrpc/main/"


def test_readme_links_work_on_the_package_index(dist):
    """The README is the index page, where a relative link leads nowhere:
    every link and picture is absolute, and each that points into this
    repository names a file that exists here and ships in the sdist."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert targets and not [t for t in targets if not t.startswith("https://")], targets
    assert f'Source = "{REPOSITORY}"' in (ROOT / "pyproject.toml").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", readme)
    assert pictures and all(p.startswith(RAW) for p in pictures), pictures  # raw: an image, not a page
    with tarfile.open(dist["sdist"]) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for target in targets:
        for base in (RAW, f"{REPOSITORY}/blob/main/"):
            if target.startswith(base):
                path = target[len(base):]
                assert (ROOT / path).is_file(), target
                assert path in shipped, f"{path} (linked from the README) is not in the sdist"


def test_wheel_in_a_fresh_venv_runs_doctor(venv, tmp_path):
    python, script = venv / "bin" / "python", venv / "bin" / "shmgrpc"
    where = run(str(python), "-c", "import shmgrpc; print(shmgrpc.__file__, shmgrpc.__version__)", cwd=tmp_path)
    path, version = where.stdout.split()
    assert Path(path).is_relative_to(venv) and version == shmgrpc.__version__
    done = subprocess.run([str(python), "-m", "shmgrpc", "doctor", "--json"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    report = json.loads(done.stdout)
    assert report["version"] == shmgrpc.__version__
    assert {c["name"] for c in report["machine"]} == {"platform", "memfd", "shm", "cma", "malloc"}
    assert done.returncode == (0 if report["ok"] else 1), done.stderr
    assert run(str(script), "--version", cwd=tmp_path).stdout.strip() == f"shmgrpc {shmgrpc.__version__}"
    listing = json.loads(run(str(script), "ls", "--json", cwd=tmp_path).stdout)
    assert "segments" in listing
    # The bench ships in the wheel too (the README says so): it needs no clone.
    usage = run(str(python), "-m", "shmgrpc.tools.bench", "--help", cwd=tmp_path).stdout
    assert usage.startswith("usage: ") and "--malloc" in usage


USER_PROGRAM = '''
"""A user's program on shmgrpc's public API."""

from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Dict, List, Tuple

import shmgrpc
import shmgrpc.aio
from shmgrpc import ChannelStatus, Config, StatsSnapshot

OPTIONS: List[Tuple[str, int]] = [("grpc.max_receive_message_length", 64 << 20)]


def moved(snap: StatsSnapshot) -> int:
    total = snap["offloaded"]["bytes"] + snap["restored"]["bytes"]
    for counts in snap["by_transport"].values():
        total += counts["offloaded"]["count"] - counts["restored"]["count"]
    return total


def client(target: str) -> Tuple[str, int]:
    config: Config = Config.from_env(threshold=256 * 1024)
    with shmgrpc.insecure_channel(target, OPTIONS, config=config) as channel:
        status: ChannelStatus = shmgrpc.channel_status(channel)
        rungs: Tuple[str, ...] = status.transports
        snap = channel.stats()
        fallbacks: Dict[str, int] = snap["fallbacks"]
        in_use: int = snap["pool"]["bytes_in_use"]
        print(rungs, status.settled, fallbacks, snap["notes"], in_use, channel.transport)
        answers: shmgrpc.Direction = status.received
        ways: List[shmgrpc.PeerRecord] = snap["peers"]
        print(status.sent.via, answers.inline, answers.recent, str(status), [p["sent"]["recent"] for p in ways])
    return status.transport, moved(shmgrpc.stats())


def serve() -> shmgrpc.ServerInterceptor:
    config = Config()
    server = shmgrpc.server(futures.ThreadPoolExecutor(2), options=OPTIONS, config=config)
    server.stop(None)
    interceptor = shmgrpc.ServerInterceptor(config, options=OPTIONS)
    pinned: int = interceptor.stats()["pool"]["cma_pinned"]
    routes: Tuple[shmgrpc.PeerStatus, ...] = interceptor.status()
    print(pinned, shmgrpc.__version__, [(r.peer, r.sent.fallback, r.received.messages) for r in routes])
    return interceptor


async def aio_client(target: str) -> str:
    async with shmgrpc.aio.insecure_channel(target, OPTIONS) as channel:
        return shmgrpc.channel_status(channel).reason


def main() -> int:
    try:
        transport, total = client("unix:/nonexistent.sock")
    except shmgrpc.ShmGrpcError as err:
        print(err.status_code)
        return 1
    serve().close()
    print(asyncio.run(aio_client("unix:/nonexistent.sock")), transport, total)
    return 0
'''


def test_mypy_strict_on_a_user_program(venv, tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[dev]')")
    program = tmp_path / "user_program.py"
    program.write_text(USER_PROGRAM)
    bad = tmp_path / "wrong.py"
    bad.write_text("import shmgrpc\ncount: str = shmgrpc.stats()['offloaded']['count']\n")
    command = [sys.executable, "-m", "mypy", "--strict", "--python-executable", str(venv / "bin" / "python"),
               "--cache-dir", str(tmp_path / "cache"), "--no-error-summary"]
    done = subprocess.run([*command, str(program)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # ...and the types are real, not Any: a wrong use is caught.
    done = subprocess.run([*command, str(bad)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and 'expression has type "int", variable has type "str"' in done.stdout, done.stdout
