"""The served model's tokenizer in the front door: its chat template, /tokenize, /detokenize.

The tokenizer directory comes from `--tokenizer`, else from the `tokenizer_dir` parameter the
server's model configs carry (the served model's, then `preprocessing`'s). Text is tokenized as
the engine tokenizes a text prompt (`tokenizer(text).input_ids`), so /tokenize counts what
`usage.prompt_tokens` will say.
"""

from __future__ import annotations

from paged_triton.client import tool_calls
from paged_triton.client.errors import ClientError
from paged_triton.client.openai_errors import OpenAIError, bad_request
from paged_triton.client.tool_calls import ToolPlan

_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_name", "parameters": {
    "type": "object", "properties": {}}}}


class ChatTemplate:
    """Renders messages with a Hugging Face tokenizer's chat template, tools included."""

    def __init__(self, tokenizer_dir: str):
        from transformers import AutoTokenizer

        self.tokenizer_dir = tokenizer_dir
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.renders_tools = self.has_template and self._renders_tools()

    def _renders_tools(self) -> bool:
        """Whether the template shows `tools` (many, SmolLM2's among them, ignore them)."""
        probe = [{"role": "user", "content": "hi"}]
        try:
            with_tools = self.tokenizer.apply_chat_template(
                probe, tools=[_PROBE_TOOL], tokenize=False, add_generation_prompt=True)
        except Exception:
            return False
        return "probe_tool_name" in with_tools

    def __call__(self, messages: list[dict], tools: ToolPlan | None = None, *,
                 add_generation_prompt: bool | None = None,
                 continue_final_message: bool = False,
                 chat_template_kwargs: dict | None = None) -> str:
        if not self.has_template:
            raise OpenAIError(400, f"the model's tokenizer ({self.tokenizer_dir}) has no chat "
                                   "template: use /v1/completions", param="messages")
        if add_generation_prompt is None:  # continuing the last message opens no new turn
            add_generation_prompt = not continue_final_message
        kwargs = dict(chat_template_kwargs or {})
        if continue_final_message:
            kwargs["continue_final_message"] = True
        if self.renders_tools:
            if tools is not None:
                kwargs["tools"] = tools.tools
        else:
            messages = tool_calls.history_as_text(messages)
            if tools is not None:
                prompt = tool_calls.system_prompt(tools)
                if messages[0]["role"] == "system":
                    messages = [{"role": "system",
                                 "content": messages[0]["content"] + "\n\n" + prompt},
                                *messages[1:]]
                else:
                    messages = [{"role": "system", "content": prompt}, *messages]
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as e:  # jinja errors: e.g. the template rejects the role order
            raise bad_request(f"cannot apply the chat template: {e}", param="messages") from None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def decode(self, token_ids: list[int]) -> str:
        vocab_size = len(self.tokenizer)
        if any(not 0 <= t < vocab_size for t in token_ids):
            raise bad_request(f"token ids must be in [0, {vocab_size})", param="tokens")
        return self.tokenizer.decode(token_ids)


async def find_tokenizer_dir(client) -> str | None:
    """The `tokenizer_dir` parameter of the served model's config, else of `preprocessing`'s."""
    from paged_triton.client.async_client import AsyncClient

    for name in (client.model, "preprocessing"):
        try:
            if name == client.model:
                config = await client.model_config()
            else:
                other = AsyncClient(client.url, protocol=client.protocol, model=name)
                try:
                    config = await other.model_config()
                finally:
                    await other.close()
        except ClientError:
            continue
        params = config.get("parameters", {}) or {}
        for key in ("tokenizer_dir", "model_dir", "tokenizer"):
            value = (params.get(key) or {}).get("string_value")
            if value and "${" not in value:
                return value
    return None
