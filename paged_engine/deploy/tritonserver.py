"""Find, prepare and run a real `tritonserver` process.

Two sources for the binary: the `server` extra (`nvidia-pytriton`, whose wheel ships the Triton
Inference Server 2.51 binary and Python backend) or a `tritonserver` on PATH / under
/opt/tritonserver, as in NGC images. The pip build needs two preparations the NGC image does not:
the Python backend stub for the running Python must sit inside `backends/python/`, and because the
stub ignores PYTHONPATH and takes its packages from the first `python3` on PATH, the server is
started with a directory holding `python3 -> sys.executable` first on PATH.

    with TritonServer("model_repository") as server:
        print(server.grpc_url)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from paged_engine.cache_dir import cache_dir

NGC_TRITON_HOME = Path("/opt/tritonserver")


class TritonServerError(RuntimeError):
    """The server could not be found, started or reached."""


def _pytriton_home() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    home = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return home if (home / "bin" / "tritonserver").exists() else None


def find_tritonserver() -> str:
    """Path of a tritonserver binary: $TRITONSERVER, the `server` extra, PATH, the NGC location."""
    explicit = os.environ.get("TRITONSERVER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise TritonServerError(f"TRITONSERVER={explicit} is not an executable file")
        return explicit
    home = _pytriton_home()
    if home is not None:
        return str(home / "bin" / "tritonserver")
    on_path = shutil.which("tritonserver")
    if on_path:
        return on_path
    ngc = NGC_TRITON_HOME / "bin" / "tritonserver"
    if ngc.exists():
        return str(ngc)
    raise TritonServerError(
        "no tritonserver found: install the server extra (pip install 'paged-triton[server]', "
        "which brings nvidia-pytriton's Triton 2.51 build), or run inside an NGC "
        "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 image where tritonserver is on PATH"
    )


def _cache_dir() -> Path:
    return cache_dir()


def prepare_backends(binary: str) -> str:
    """A backend directory whose python backend has a stub for this Python.

    The pip build keeps stubs per Python version beside the backends; copy the backend with the
    matching stub into a cache directory rather than writing into site-packages. NGC images
    already ship a ready backend directory.
    """
    home = Path(binary).resolve().parent.parent
    backends = home / "backends"
    stubs = home / "python_backend_stubs"
    if not stubs.exists():
        if (backends / "python").exists():
            return str(backends)
        raise TritonServerError(f"no backends directory next to {binary}")
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = stubs / pyver / "triton_python_backend_stub"
    if not stub.exists():
        have = sorted(p.name for p in stubs.iterdir())
        raise TritonServerError(
            f"the tritonserver at {binary} has no Python backend stub for Python {pyver} "
            f"(it has {', '.join(have)}); use one of those Python versions"
        )
    dest = _cache_dir() / f"backends-py{pyver}"
    marker = dest / "python" / ".source"
    source_id = f"{stub}:{stub.stat().st_mtime_ns}"
    if not marker.exists() or marker.read_text() != source_id:
        _cache_dir().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="backends.", dir=_cache_dir()))
        shutil.copytree(backends, tmp / "b", dirs_exist_ok=True)
        target = tmp / "b" / "python" / "triton_python_backend_stub"
        shutil.copy2(stub, target)
        target.chmod(0o755)
        (tmp / "b" / "python" / ".source").write_text(source_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp / "b", dest)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def stub_python_dir() -> str:
    """A directory whose `python3` is this interpreter, to put first on PATH for the stub.

    $TRITON_STUB_BIN, when set, names that directory instead.

    The interpreter's own directory when it holds a `python3` (a virtual environment is found
    through the pyvenv.cfg beside it, so a symlink elsewhere would lose the venv's packages);
    otherwise a cache directory with a `python3` symlink.
    """
    explicit = os.environ.get("TRITON_STUB_BIN")
    if explicit:  # a prepared environment (e.g. numpy<2 where this interpreter has numpy 2)
        return explicit
    own = Path(sys.executable).parent
    if (own / "python3").exists() and (own / "python3").resolve() == Path(sys.executable).resolve():
        return str(own)
    d = _cache_dir() / "stub-python" / f"py{sys.version_info.major}{sys.version_info.minor}"
    d.mkdir(parents=True, exist_ok=True)
    link = d / "python3"
    if not link.is_symlink() or os.readlink(link) != sys.executable:
        tmp = d / f"python3.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(sys.executable)
        os.replace(tmp, link)
    return str(d)


def stub_library_path(binary: str) -> list[str]:
    """Library directories the stub must search first.

    The stub links `libpython3.X.so`: it has to be this interpreter's own, since the standard
    library's extension modules are built against it (a distribution's older libpython of the
    same minor version lacks symbols they use). The pip build's stub also finds its bundled
    CUDA runtime through an RPATH relative to its original location, which a copy no longer has.
    """
    import sysconfig

    dirs = []
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlibrary = sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlibrary and (Path(libdir) / ldlibrary).exists():
        dirs.append(libdir)
    libs = Path(binary).resolve().parents[3] / "nvidia_pytriton.libs"
    if libs.is_dir():
        dirs.append(str(libs))
    return dirs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


class TritonServer:
    """A tritonserver child process serving one model repository.

    Args:
        model_repository: directory of models.
        grpc_port, http_port, metrics_port: fixed ports, or None for free ones.
        log_file: where the server's output goes (a temporary file when None).
        extra_args: more tritonserver flags.
        env: extra environment variables for the server.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        log_file: str | os.PathLike | None = None,
        extra_args: tuple[str, ...] | list[str] = (),
        env: dict[str, str] | None = None,
        binary: str | None = None,
    ):
        self.model_repository = str(Path(model_repository).resolve())
        if not Path(self.model_repository).is_dir():
            raise TritonServerError(f"model repository {self.model_repository} does not exist")
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        for name, port in (("gRPC", self.grpc_port), ("HTTP", self.http_port),
                           ("metrics", self.metrics_port)):
            if port_in_use(port):
                raise TritonServerError(f"{name} port {port} is already in use; pick another")
        if log_file is None:
            fd, log_file = tempfile.mkstemp(prefix="tritonserver.", suffix=".log")
            os.close(fd)
        self.log_file = str(log_file)
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.binary = binary or find_tritonserver()
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--model-repository={self.model_repository}",
            f"--backend-directory={prepare_backends(self.binary)}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--log-verbose=0",
            *self.extra_args,
        ]

    def start(self, timeout_s: float = 180.0) -> "TritonServer":
        env = dict(os.environ)
        env["PATH"] = stub_python_dir() + os.pathsep + env.get("PATH", "")
        # The stub takes packages from that python3's site-packages, but a source checkout that is
        # not installed still needs to be importable from the model files.
        project_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = project_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            stub_library_path(self.binary) + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
        env.update(self.env)
        self._log = open(self.log_file, "ab")
        self._proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str, timeout_s: float = 2.0) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout_s) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {self._proc.returncode} while starting; "
                    f"log ({self.log_file}):\n{self.log_tail()}"
                )
            if self._get("/v2/health/ready") == 200:
                return
            failed = self._failed_models()
            if failed:
                raise TritonServerError(
                    "model(s) failed to load: " + "; ".join(failed)
                    + f"\nlog ({self.log_file}):\n{self.log_tail()}"
                )
            time.sleep(0.25)
        raise TritonServerError(
            f"tritonserver was not ready after {timeout_s:.0f} s; log ({self.log_file}):\n"
            f"{self.log_tail()}"
        )

    def _failed_models(self) -> list[str]:
        """Models that Triton gave up loading (it keeps running, never ready, without this)."""
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}",
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=2.0) as r:
                index = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return []
        return [f"{m.get('name')}: {m.get('reason')}" for m in index
                if m.get("state") == "UNAVAILABLE" and m.get("reason")]

    def is_ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def log_text(self) -> str:
        try:
            return Path(self.log_file).read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, num_lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-num_lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc is not None:
            # The stubs are children of the server; make sure none outlives it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL the server and its stubs now (a stuck or broken server; no graceful exit)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout_s: float = 600.0) -> "TritonServer":
        """Kill the server and start it again on the same ports and repository."""
        self.kill()
        deadline = time.monotonic() + 30
        while any(port_in_use(p) for p in (self.grpc_port, self.http_port, self.metrics_port)):
            if time.monotonic() > deadline:
                raise TritonServerError("the old tritonserver's ports are still in use")
            time.sleep(0.2)
        return self.start(timeout_s=timeout_s)

    def reload_model(self, model: str, timeout_s: float = 600.0) -> None:
        """Reload one model in place (explicit model-control mode). Triton reloads a loaded
        model only when its files changed, so its config.pbtxt is touched first."""
        config = Path(self.model_repository) / model / "config.pbtxt"
        os.utime(config)
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/models/{model}/load",
                                     data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                if r.status != 200:
                    raise TritonServerError(f"loading {model} answered {r.status}")
        except urllib.error.HTTPError as e:
            raise TritonServerError(
                f"loading {model} failed: {e.code} {e.read().decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as e:
            raise TritonServerError(f"loading {model} failed: {e}") from None

    def unload_model(self, model: str, timeout_s: float = 10.0) -> bool:
        """Unload one model (explicit model-control mode); False when that failed or timed out."""
        req = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/models/{model}/unload", data=b"{}",
            method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait(self) -> int:
        assert self._proc is not None
        return self._proc.wait()

    def __enter__(self) -> "TritonServer":
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
