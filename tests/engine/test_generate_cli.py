"""The offline CLI: python -m paged_engine.generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "paged_engine.generate", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_json_and_errors(tiny_model_dir):
    r = _run(["--model", tiny_model_dir, "--prompt", "Hello world", "--prompt", "東京",
              "--max-tokens", "5", "--ignore-eos", "--json", "--logprobs", "1", "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["Hello world", "東京"]
    assert all(len(x["token_ids"]) == 5 and x["finish_reason"] == "length" for x in lines)
    assert all(len(x["logprobs"]) == 5 for x in lines)


def test_cli_in_process(tiny_model_dir, capsys):
    from paged_engine.generate import main

    assert main(["--model", tiny_model_dir, "--prompt", "x", "--engine-arg", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["--model", tiny_model_dir, "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["--model", tiny_model_dir, "--prompt", "Hi", "--max-tokens", "3", "--stream", "--ignore-eos",
                 "--num-kv-blocks", "16", "--engine-arg", "block_size=4"]) == 0
    captured = capsys.readouterr()
    assert "1 prompt(s), 3 tokens" in captured.err
