"""The `paged-triton` launcher: its errors, and the README's first command end to end."""

import json
import os
import socket
import subprocess
import sys

import pytest

from paged_engine import launcher, tritonserver


def run_launcher(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "paged_engine.launcher", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def test_missing_model_dir_is_a_clear_error(tmp_path):
    r = run_launcher("serve", "--model", str(tmp_path / "nope"), "--prepare-only")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "nope" in r.stderr
    assert "Traceback" not in r.stderr


def test_directory_without_config_is_rejected(tmp_path):
    r = run_launcher("serve", "--model", str(tmp_path), "--prepare-only")
    assert r.returncode == 2 and "no config.json" in r.stderr


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(launcher.LaunchError) as e:
        launcher.check_model_dir(str(tmp_path))
    assert "GPT2LMHeadModel" in str(e.value) and "LlamaForCausalLM" in str(e.value)


def test_port_in_use_is_reported(tiny_model_dir):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_launcher("serve", "--model", tiny_model_dir, "--grpc-port", str(port),
                         "--no-demo")
    assert r.returncode == 2
    assert f"--grpc-port {port} is already in use" in r.stderr


def test_no_tritonserver_found(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITONSERVER", raising=False)
    monkeypatch.setattr(tritonserver, "_pytriton_home", lambda: None)
    monkeypatch.setattr(tritonserver, "NGC_TRITON_HOME", tmp_path / "none")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(tritonserver.TritonServerError, match="no tritonserver found"):
        tritonserver.find_tritonserver()


def test_tritonserver_env_must_name_an_executable(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITONSERVER", str(tmp_path / "missing"))
    with pytest.raises(tritonserver.TritonServerError, match="not an executable"):
        tritonserver.find_tritonserver()


def test_bad_engine_arg_syntax():
    with pytest.raises(launcher.LaunchError, match="not key=value"):
        launcher.parse_engine_args(["max_num_seqs"])
    assert launcher.parse_engine_args(["max_num_seqs=4", "dtype=float32"]) == {
        "max_num_seqs": 4, "dtype": "float32"}


@pytest.mark.server
def test_serve_streams_the_demo_request(tmp_path, tiny_model_dir):
    """The README's first command, with free ports and exiting after the demo request."""
    from paged_engine import LLM, SamplingParams
    from paged_engine.tritonserver import free_port

    prompt = "Hello world! 你好"
    r = run_launcher(
        "serve", "--model", tiny_model_dir, "--repository-dir", str(tmp_path / "repo"),
        "--grpc-port", str(free_port()), "--http-port", str(free_port()),
        "--metrics-port", str(free_port()), "--demo-prompt", prompt, "--demo-max-tokens", "12",
        "--exit-after-demo", "--engine-arg", "device=cpu", "--engine-arg", "dtype=float32",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    streamed = r.stdout.split("streamed: ", 1)[1].rsplit("\n", 1)[0]
    expected = LLM(tiny_model_dir, device="cpu", dtype="float32").generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0.0))[0].text
    assert streamed == expected
    assert json.loads((tmp_path / "repo" / "paged_llm" / "1" / "model.json").read_text())[
        "model"] == tiny_model_dir
