"""`paged-client` argument handling (no server)."""

import pytest

from paged_triton.client.cli import _sampling_from_args, build_parser, main


def test_generate_flags_become_sampling():
    args = build_parser().parse_args([
        "generate", "hi", "--max-tokens", "5", "--temperature", "0", "--stop", "a", "--stop", "b",
        "--stop-token-ids", "1,2", "--ignore-eos", "--param", "min_p=0.1", "--param", "x=word"])
    assert _sampling_from_args(args) == {"max_tokens": 5, "temperature": 0.0, "stop": ["a", "b"],
                                         "stop_token_ids": [1, 2], "ignore_eos": True,
                                         "min_p": 0.1, "x": "word"}
    assert args.protocol == "grpc" and args.model == "paged_llm" and not args.stream


def test_unset_flags_send_nothing():
    assert _sampling_from_args(build_parser().parse_args(["generate", "hi"])) == {}


def test_bench_defaults():
    args = build_parser().parse_args(["bench"])
    assert (args.num_requests, args.request_rate, args.max_concurrency) == (100, "inf", None)


def test_connection_failure_exit_code_names_url(capsys):
    assert main(["generate", "hi", "--url", "127.0.0.1:1", "--timeout", "5"]) == 1
    assert "127.0.0.1:1" in capsys.readouterr().err
    assert main(["health", "--url", "127.0.0.1:1", "--protocol", "http"]) == 1
    assert "127.0.0.1:1" in capsys.readouterr().err


def test_bad_param_syntax():
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--param", "novalue", "--url", "127.0.0.1:1"])
