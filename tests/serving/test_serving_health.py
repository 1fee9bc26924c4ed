"""The probes the supervisor and `paged-triton probe` use, against the real server: every model
answers its probe, paged_llm's health_check answers at once with an empty final."""

import subprocess
import sys

import numpy as np
import pytest

from paged_engine.deploy.supervisor import OK, probe_once
from serving_client import inputs, run_one

pytestmark = pytest.mark.server


def test_every_model_answers_its_probe(triton):
    outcomes = probe_once(triton.grpc_url, ["paged_llm", "preprocessing", "postprocessing",
                                            "tensorrt_llm_bls"])
    assert outcomes == dict.fromkeys(outcomes, OK) and len(outcomes) == 4
    s = run_one(triton.grpc_url, "paged_llm", inputs(health_check=np.array([True])))
    assert s.error is None and s.finals == 1 and s.responses == []


def test_probe_command_exit_code(triton):
    r = subprocess.run([sys.executable, "-m", "paged_engine.deploy.launcher", "probe", "--url",
                        triton.grpc_url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "paged_engine.deploy.launcher", "probe", "--url",
                        "127.0.0.1:1", "--timeout-s", "2"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "unreachable" in r.stdout
