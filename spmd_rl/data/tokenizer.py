"""Tokenizer loading, chat templating, and a tiny char-level tokenizer for synthetic tasks.

Every prompt goes through the tokenizer's chat template, so a tokenizer without one is a user
error here rather than a silent fallback to raw text that would train on a different format
than the one used at inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from spmd_rl.errors import UserError, training_checkpoint_hint

PAD, USER, ASSISTANT, END, UNK = "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>", "<|unk|>"
DEFAULT_ALPHABET = "0123456789+-*=#?. abcdefghijklmnopqrstuvwxyz"

# Assistant turns close with <|end|> (the eos), so a model trained on full conversations learns
# to stop; every other role (user, system, tool) is rendered as a user turn.
CHAR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + '<|end|>' }}"
    "{% else %}{{ '<|user|>' + message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _no_template_message(path: str) -> str:
    return f"tokenizer at {path} has no chat_template: set data.chat_template or use an instruct tokenizer"


def load_tokenizer(
    path: str,
    *,
    trust_remote_code: bool = False,
    require_chat_template: bool = True,
    chat_template: str | None = None,
):
    """Load a Hugging Face tokenizer from a local folder.

    ``chat_template`` (a Jinja string, or a path to a ``.jinja`` file) replaces the folder's
    template, which is how a base model's tokenizer is made usable. The pad token falls back to
    eos because batches are padded and masked, never attended through.
    """
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise UserError(f"tokenizer folder {path} does not exist: set model.path (or the tokenizer path) to a local folder")
    hint = training_checkpoint_hint(path)
    if hint:
        raise UserError(f"cannot load a tokenizer from {path}{hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__  # keep the message on one line
        raise UserError(f"cannot load a tokenizer from {path}: {reason}") from None
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer when the folder has no tokenizer files
        raise UserError(f"{path} has no tokenizer files (tokenizer.json / vocab): copy them next to the model "
                        "or set model.tokenizer_path")
    if chat_template is not None:
        tokenizer.chat_template = _read_template(chat_template)
    if require_chat_template:
        check_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _read_template(chat_template: str) -> str:
    """A Jinja template given inline, or read from a file (any Jinja template contains '{')."""
    if "{" in chat_template:
        return chat_template
    if not Path(chat_template).is_file():
        raise UserError(f"data.chat_template={chat_template} is neither a Jinja template nor an existing file")
    return Path(chat_template).read_text()


def check_chat_template(tokenizer) -> None:
    """Raise a UserError if ``tokenizer`` cannot render chat messages."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(_no_template_message(getattr(tokenizer, "name_or_path", "?") or "?"))


def to_messages(prompt: Any) -> list[dict[str, Any]]:
    """A prompt cell as a chat message list: a plain string becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if hasattr(prompt, "tolist"):  # numpy object arrays from pandas-written files
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in prompt):
        raise UserError(f"a prompt cell must be a string or a list of {{'role': ..., 'content': ...}} messages, "
                        f"got {_preview(prompt)}: fix the prompt column (data.prompt_key) of the parquet file")
    return [dict(m) for m in prompt]


def _preview(value: Any) -> str:
    text = " ".join(repr(value).split())
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def encode_chat_prompts(
    tokenizer, conversations: Sequence[list[dict[str, Any]]], chat_template_kwargs: dict | None = None
) -> list[list[int]]:
    """Token ids of each conversation rendered with ``add_generation_prompt=True``.

    Equal to ``apply_chat_template(..., tokenize=True)`` per conversation (which also encodes the
    rendered text without adding special tokens), but renders and tokenizes in one batch each.
    """
    check_chat_template(tokenizer)
    if not conversations:
        return []
    texts = tokenizer.apply_chat_template(
        list(conversations), add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {})
    )
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def build_char_tokenizer(out_dir: str, alphabet: str = DEFAULT_ALPHABET):
    """Build, save and return a char-level tokenizer: one id per alphabet character.

    Ids 0-4 are ``<|pad|> <|user|> <|assistant|> <|end|> <|unk|>`` (eos = ``<|end|>``), then the
    alphabet in order. ``decode(encode(s)) == s`` for any ``s`` over the alphabet.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))  # dedupe, keep order
    specials = [PAD, USER, ASSISTANT, END, UNK]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character (newlines included) is its own pre-token; Fuse joins without spaces.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=END,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        clean_up_tokenization_spaces=False,  # " ." must survive a round trip
    )
    tokenizer.chat_template = CHAR_CHAT_TEMPLATE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
