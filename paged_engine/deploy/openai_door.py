"""The OpenAI front door as a child process of `paged-triton serve --openai-port N`.

It runs `python -m paged_triton.client.openai_server` against the server's gRPC port (and proxies
its metrics port), starts once tritonserver is ready, and stops before it, so one command
serves the OpenAI API. A door that dies is reported by `poll()` (the launcher then stops).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


class OpenAIDoorError(RuntimeError):
    """The door did not start; the message holds its output."""


class OpenAIDoor:
    """One front door process.

    Args:
        port: its HTTP port; host: the address it binds.
        grpc_url, metrics_url: the tritonserver it calls and whose metrics /metrics proxies.
        tokenizer: the tokenizer directory (chat template, /tokenize).
        api_key: when set, /v1/* needs `Authorization: Bearer <api_key>`.
        served_model_name: the model id /v1/models shows (default paged_llm).
        log_requests: the door logs a line per request (relayed to this process's stdout).
    """

    def __init__(self, port: int, grpc_url: str, metrics_url: str, host: str = "0.0.0.0",
                 tokenizer: str | None = None, api_key: str | None = None,
                 served_model_name: str | None = None, log_requests: bool = True):
        self.port, self.host = port, host
        self.grpc_url, self.metrics_url = grpc_url, metrics_url
        self.tokenizer, self.api_key, self.served_model_name = tokenizer, api_key, served_model_name
        self.log_requests = log_requests
        self._proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}/v1"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "paged_triton.client.openai_server", "--host", self.host,
               "--port", str(self.port), "--triton-url", self.grpc_url,
               "--metrics-url", self.metrics_url]
        if self.tokenizer:
            cmd += ["--tokenizer", self.tokenizer]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if not self.log_requests:
            cmd.append("--disable-log-requests")
        return cmd

    def start(self, timeout_s: float = 60.0) -> "OpenAIDoor":
        env = dict(os.environ)
        if self.api_key:  # not on the command line, where `ps` would show it
            env["PAGED_TRITON_API_KEY"] = self.api_key
        self._proc = subprocess.Popen(self.command(), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout_s
        health = self.base_url[: -len("/v1")] + "/health"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                out = self._proc.stdout.read() if self._proc.stdout else ""
                raise OpenAIDoorError(f"the OpenAI front door exited ({self._proc.returncode}):\n"
                                      f"{out[-4000:]}")
            try:
                with urllib.request.urlopen(health, timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        else:
            self.stop()
            raise OpenAIDoorError(f"the OpenAI front door did not answer {health} in {timeout_s} s")
        # Its log goes on to ours from here; a reader thread keeps the pipe from filling.
        import threading

        def relay(stream) -> None:
            for line in stream:
                sys.stdout.write("openai: " + line)

        threading.Thread(target=relay, args=(self._proc.stdout,), daemon=True).start()
        return self

    def poll(self) -> int | None:
        """None while it runs, else its exit code."""
        return None if self._proc is None else self._proc.poll()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=timeout_s)
