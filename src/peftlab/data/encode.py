"""Tokenize examples for causal-LM training with the loss on the target only.

One training sequence is ``prompt ++ target``::

    input_ids = [BOS?] template-before  source (truncated)  template-after | target tokens  EOS
    labels    = -100 ...                                                    | target tokens  EOS

* The prompt is at most ``task.max_source_tokens`` tokens, special tokens and chat markup included. Only the source
  is shortened to get there, never the template and never the target.
* The target is at most ``task.max_target_tokens`` tokens: ``max_target_tokens - 1`` text tokens plus EOS.
* The prompt is tokenized as one text (not template and source separately) so its tokens are the ones the model
  sees at generation, where :meth:`PromptEncoder.encode_prompts` builds the same ids.

Truncation works on character offsets from the fast tokenizer: tokenize the whole prompt, find the tokens that fall
inside the source, cut the source text at the start of the first token over budget, and tokenize again (a cut can
change the tokens at the seam, so this repeats until the prompt fits; one or two rounds in practice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peftlab.config import ConfigError, TaskConfig
from peftlab.tasks.base import Example, Task

IGNORE_INDEX = -100  # labels with this value add nothing to the loss (torch cross_entropy's ignore_index)
# Stands in for the source when the chat template is rendered once per template; a private-use character that no
# template rewrites.
_SOURCE_MARK = "\ue000peftlab-source\ue000"
_CHUNK = 512  # examples tokenized per call: bounds the memory of the offset lists of long articles


@dataclass
class EncodedExample:
    """One tokenized training sequence: ``labels`` is ``IGNORE_INDEX`` on the prompt and equals ``input_ids`` after."""

    input_ids: list[int]
    labels: list[int]

    @property
    def prompt_length(self) -> int:
        """Number of prompt tokens (the labels masked with ``IGNORE_INDEX``)."""
        n = 0
        while n < len(self.labels) and self.labels[n] == IGNORE_INDEX:
            n += 1
        return n

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptEncoder:
    """Builds prompt ids (for generation) and prompt + target ids with target-only labels (for training).

    Args:
        tokenizer: a Hugging Face tokenizer; a fast one gives exact character offsets for truncation.
        task: the task whose template frames the source.
        task_cfg: ``max_source_tokens``, ``max_target_tokens`` and ``chat_template`` are used.

    Raises:
        ConfigError: ``task.chat_template`` is set but the tokenizer has no chat template, or it has no EOS token.
    """

    def __init__(self, tokenizer: Any, task: Task, task_cfg: TaskConfig) -> None:
        self.tokenizer = tokenizer
        self.task = task
        self.max_prompt_tokens = task_cfg.max_source_tokens
        self.max_target_tokens = task_cfg.max_target_tokens
        self.use_chat_template = task_cfg.chat_template
        if self.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("task.chat_template=true, but this model's tokenizer has no chat template; set "
                              "task.chat_template=false or use an instruct model whose tokenizer defines one")
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token, which ends every training target; set "
                              "tokenizer.eos_token before encoding")
        self.eos_id: int = tokenizer.eos_token_id
        self._has_offsets = bool(getattr(tokenizer, "is_fast", False))
        self._frames: dict[tuple[str, str], tuple[str, str]] = {}

    # ---------------------------------------------------------------------------------------------------- prompts
    def prompt_ids(self, example: Example) -> list[int]:
        """Token ids of the example's prompt (source truncated to fit ``max_source_tokens``)."""
        return self.encode_prompts([example])[0]

    def encode_prompts(self, examples: Sequence[Example]) -> list[list[int]]:
        """Prompt ids of many examples, tokenized in batches (the fast path for datasets)."""
        out: list[list[int]] = []
        for start in range(0, len(examples), _CHUNK):
            out.extend(self._encode_prompt_chunk(examples[start:start + _CHUNK]))
        return out

    def _frame(self, example: Example) -> tuple[str, str]:
        """The text before and after the source in what is tokenized (template, plus chat markup when used)."""
        before, after = self.task.prompt_parts(example.source)
        key = (before, after)
        if key not in self._frames:
            if self.use_chat_template:
                # Rendered once per template with a marker in place of the source; assumes the chat template
                # copies the message content verbatim (true of the usual Jinja templates).
                rendered = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": before + _SOURCE_MARK + after}], tokenize=False,
                    add_generation_prompt=True)
                if not isinstance(rendered, str) or rendered.count(_SOURCE_MARK) != 1:
                    raise ConfigError("the tokenizer's chat template does not copy the user message verbatim; use "
                                      "task.chat_template=false")
                pre, post = rendered.split(_SOURCE_MARK)
                self._frames[key] = (pre, post)
            else:
                self._frames[key] = (before, after)
        return self._frames[key]

    def _tokenize(self, texts: list[str], add_special_tokens: bool, offsets: bool = False) -> Any:
        kwargs: dict[str, Any] = {"add_special_tokens": add_special_tokens, "verbose": False}
        if offsets and self._has_offsets:
            kwargs["return_offsets_mapping"] = True
        return self.tokenizer(texts, **kwargs)

    def _encode_prompt_chunk(self, examples: Sequence[Example]) -> list[list[int]]:
        frames = [self._frame(example) for example in examples]
        sources = [example.source for example in examples]
        result: list[list[int]] = [[] for _ in examples]
        pending = list(range(len(examples)))
        # A chat template writes its own special tokens (e.g. <|im_start|>) into the text: add none on top.
        add_special = not self.use_chat_template
        while pending:
            texts = [frames[i][0] + sources[i] + frames[i][1] for i in pending]
            encoded = self._tokenize(texts, add_special, offsets=True)
            still_long = []
            for j, i in enumerate(pending):
                ids = encoded["input_ids"][j]
                if len(ids) <= self.max_prompt_tokens:
                    result[i] = list(ids)
                    continue
                offsets = encoded["offset_mapping"][j] if self._has_offsets else None
                sources[i] = self._shorter_source(sources[i], len(ids), offsets, len(frames[i][0]))
                still_long.append(i)
            pending = still_long
        return result

    def _shorter_source(self, source: str, n_tokens: int, offsets: list[tuple[int, int]] | None,
                        source_start: int) -> str:
        """``source`` cut so the prompt loses at least ``n_tokens - max_prompt_tokens`` tokens."""
        if not source:
            raise ConfigError(f"task.max_source_tokens={self.max_prompt_tokens} is smaller than the prompt template "
                              f"alone ({n_tokens} tokens with an empty source); raise it or shorten task.template")
        excess = n_tokens - self.max_prompt_tokens
        if offsets is not None:
            source_end = source_start + len(source)
            # Start characters (relative to the source) of the tokens that lie inside the source text.
            starts = [s - source_start for s, e in offsets if e > s and s >= source_start and e <= source_end]
            keep = len(starts) - excess
            cut = starts[keep] if keep > 0 else 0
        else:  # slow tokenizer: no offsets, so keep the first tokens of the source alone and decode them
            ids = self._tokenize([source], add_special_tokens=False)["input_ids"][0]
            kept = self.tokenizer.decode(ids[: max(0, len(ids) - excess)])
            cut = len(kept)  # exact when decoding round-trips; otherwise close, and the loop re-checks the length
        # rstrip: a cut often leaves a dangling space before the template's text; strictly shorter ensures progress.
        return source[: min(cut, len(source) - 1)].rstrip()

    # ---------------------------------------------------------------------------------------------------- targets
    def target_ids(self, text: str) -> list[int]:
        """Target tokens without BOS, cut to ``max_target_tokens - 1``, then EOS."""
        return self.encode_targets([text])[0]

    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`target_ids` of many texts in one tokenizer call."""
        if not texts:
            return []
        encoded = self._tokenize(list(texts), add_special_tokens=False)
        limit = self.max_target_tokens - 1
        return [list(ids[:limit]) + [self.eos_id] for ids in encoded["input_ids"]]

    # -------------------------------------------------------------------------------------------------- sequences
    def encode(self, example: Example) -> EncodedExample:
        """Prompt + target ids, labels ``IGNORE_INDEX`` on the prompt and equal to the ids on the target."""
        return self.encode_many([example])[0]

    def encode_many(self, examples: Sequence[Example]) -> list[EncodedExample]:
        """:meth:`encode` for a list, with batched tokenization."""
        prompts = self.encode_prompts(examples)
        targets = self.encode_targets([example.target for example in examples])
        return [EncodedExample(input_ids=prompt + target, labels=[IGNORE_INDEX] * len(prompt) + target)
                for prompt, target in zip(prompts, targets, strict=True)]
