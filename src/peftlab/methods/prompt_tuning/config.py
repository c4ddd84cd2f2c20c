"""Options of soft prompt tuning (``method=prompt-tuning``)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.options import MethodOptions, check, check_choice, opt

PROMPT_INITS = ("random", "vocab", "text")


@dataclass
class PromptTuningConfig(MethodOptions):
    n_tokens: int = opt(20, "number of virtual tokens prepended to every input")
    init: str = opt(
        "vocab",
        "random: N(0, s^2) with s the std of the embedding matrix | vocab: embeddings of uniformly sampled token ids "
        "| text: embeddings of init_text's tokens, repeated or cut to n_tokens",
    )
    init_text: str | None = opt(None, "text whose token embeddings initialise the prompt (init=text)")
    init_token_ids: list[int] | None = opt(
        None,
        "token ids of init_text; filled by the runner from the tokenizer before apply (init=text); "
        "may be given directly instead of init_text",
    )

    def check(self) -> None:
        check(self.n_tokens > 0, "method.n_tokens", f"must be an integer > 0, got {self.n_tokens!r}")
        check_choice(self.init, "method.init", PROMPT_INITS)
        if self.init == "text":
            check(bool(self.init_text) or bool(self.init_token_ids), "method.init_text",
                  "init=text needs a non-empty init_text (or init_token_ids)")
        else:
            check(self.init_text is None, "method.init_text", f"is only used with init=text (init is {self.init!r})")
            check(self.init_token_ids is None, "method.init_token_ids",
                  f"is only used with init=text (init is {self.init!r})")
        if self.init_token_ids is not None:
            ids = self.init_token_ids
            check(len(ids) > 0 and all(i >= 0 for i in ids), "method.init_token_ids",
                  f"must be a non-empty list of token ids >= 0, got {ids!r}")
