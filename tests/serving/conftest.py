"""One real tritonserver for all of tests/serving (each start costs tens of seconds on CPU).

The served model is the session's tiny byte-level Llama with one change: a second EOS id, a
token that greedy decoding of EOS_PROMPT produces early, so that a test can see a request end on
EOS (random weights otherwise almost never produce the tokenizer's EOS). The offline reference
`LLM` loads the same directory, so it has the same EOS ids.
"""

from __future__ import annotations

import json
import shutil

import pytest

from serving_client import EOS_PROMPT

ENGINE_ARGS = dict(block_size=16, num_kv_blocks=96, max_model_len=512, max_num_seqs=32)


def _eos_token_for_probe(model_dir: str) -> int:
    """A token that greedy decoding of EOS_PROMPT produces a few tokens in (via transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok(EOS_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(4):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return int(ids[0, -1])


@pytest.fixture(scope="session")
def serving_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    dst = tmp_path_factory.mktemp("serving-model") / "model"
    shutil.copytree(tiny_model_dir, dst)
    extra_eos = _eos_token_for_probe(str(dst))
    gen_path = dst / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    eos = gen.get("eos_token_id")
    eos = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
    gen["eos_token_id"] = eos + [extra_eos]
    gen_path.write_text(json.dumps(gen))
    return str(dst)


@pytest.fixture(scope="session")
def engine_args() -> dict:
    """The engine arguments of every server (and of the offline reference) in tests/serving."""
    return dict(ENGINE_ARGS)


@pytest.fixture(scope="session")
def offline_llm(serving_model_dir):
    """The offline reference: the same model and engine arguments as the server's."""
    from paged_engine import LLM

    llm = LLM(serving_model_dir, **ENGINE_ARGS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def triton(serving_model_dir, triton_server_factory, tmp_path_factory):
    """A started tritonserver serving paged_llm, preprocessing, postprocessing and ensemble."""
    from paged_engine.deploy.repository import prepare_model_repository

    repo = prepare_model_repository(tmp_path_factory.mktemp("repo"), serving_model_dir,
                                    **ENGINE_ARGS)
    # Triton 2.51 keeps counting a cancelled ensemble request as in flight, and shutdown would
    # wait the default 30 s exit timeout for it.
    server = triton_server_factory(repo, extra_args=["--exit-timeout-secs=3"])
    return server
