"""benchmarks.cpu_peers without running the engines: the workloads as the issue defines them, the
report's ratios, and that the file stays importable by a foreign interpreter (stdlib only at
module level)."""

import ast
import random
from pathlib import Path

from benchmarks import cpu_peers


def test_workloads_are_the_issues_draw():
    small = cpu_peers.make_requests("small", 49152)
    assert len(small) == 32 and small == cpu_peers.make_requests("small", 49152)
    random.seed(0)  # the issue's draw, written out: prompt length, output length, then the ids
    for prompt, max_tokens in small[:3]:
        n, m = random.randint(50, 300), random.randint(50, 300)
        assert (len(prompt), max_tokens) == (n, m)
        assert prompt == [random.randint(0, 49151) for _ in range(n)]
    assert all(50 <= len(p) <= 300 and 50 <= n <= 300 for p, n in small)
    large = cpu_peers.make_requests("large", 100)
    assert len(large) == 128 and all(50 <= len(p) <= 1024 and 50 <= n <= 1024 for p, n in large)
    assert max(max(p) for p, _ in large) < 100


def test_report_ratios():
    runs = [dict(workload="small", dtype="bfloat16", engine=e, output_tokens_per_s=v)
            for e, v in (("ours", 60.0), ("transformers", 20.0), ("vllm", 150.0), ("ours", 80.0))]
    runs.append(dict(workload="small", dtype="float32", engine="vllm", error="boom"))
    table = cpu_peers.format_report({"runs": runs})
    assert "| small | bfloat16 | 70.0 | 20.0 | 150.0 | 3.50x | 0.47x |" in table
    assert "float32" not in table  # a failed run is no number


def test_module_level_imports_are_stdlib_only():
    tree = ast.parse(Path(cpu_peers.__file__).read_text())
    names = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert names <= {"__future__", "argparse", "datetime", "json", "os", "platform", "random",
                     "subprocess", "sys", "time", "pathlib"}, names
