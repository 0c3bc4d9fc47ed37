"""OpenAI request bodies (the subset we serve), validated strictly: bad input is a clear 400."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from .sampling import SamplingParams

MAX_STOP = 4
MAX_N = 16            # choices per prompt
MAX_PROMPTS = 64      # prompts in one completions request
MAX_LOGPROBS = 20     # top logprobs per position (OpenAI's limit)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo (completions): "
                                   "score the prompt, generate nothing")
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="SkyNet extension: sample from the k most likely tokens")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt, each its own random stream")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    ignore_eos: bool = Field(False, description="SkyNet extension (as in vLLM): generate max_tokens "
                             "tokens even past end-of-sequence; for benchmarks")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.seed,
                              self.presence_penalty, self.frequency_penalty)

    def model_post_init(self, _ctx) -> None:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens


class CompletionRequest(_Common):
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS, description=
                                       "logprobs of each token and of the k most likely ones")
    echo: StrictBool = Field(False, description="return the prompt before the completion "
                             "(with its tokens' logprobs when logprobs is set)")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
            if any(len(p) == 0 for p in v):
                raise ValueError("a prompt is empty")
        if isinstance(v, (str, list)) and len(v) == 0:
            raise ValueError("the prompt is empty")
        return v

    @model_validator(mode="after")
    def _zero_tokens(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only allowed with echo (to score the prompt)")
        return self

    def prompt_values(self) -> list[str | list[int]]:
        """The batch of prompts: each a string or a list of token ids."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [self.prompt]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict], None] = None

    @field_validator("content")
    @classmethod
    def _text(cls, v):
        if isinstance(v, list):  # content parts: keep the text ones
            texts = [p.get("text") for p in v if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(v) or not all(isinstance(t, str) for t in texts):
                raise ValueError("only text content parts are supported")
            return "".join(texts)
        return v


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: StrictBool = Field(False, description="logprobs of each generated token")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS, description=
                                           "with logprobs: the k most likely tokens at each position")

    @model_validator(mode="after")
    def _checks(self):
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be >= 1")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): a text, or chat messages rendered with the chat template."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids -> text."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[StrictInt]
