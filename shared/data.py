"""Preference rows: turn each raw row into a validated `Pair` (the files themselves are
read by shared/sources.py, re-exported here).

Row formats (design: issue "stage one", section "Data loading"):
- explicit prompt: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of messages, `chosen` / `rejected` lists of assistant
  messages (a plain string is taken as one assistant message); answers that repeat the
  prompt's messages first have them stripped;
- full conversations (HuggingFaceH4/ultrafeedback_binarized): `prompt` a string, `chosen` /
  `rejected` whole conversations that start with it; their shared first messages are the
  prompt, whose last user message must equal the `prompt` column (else `prompt_mismatch`);
- implicit prompt: only `chosen` and `rejected`, as strings that share their beginning
  (Anthropic HH), or as message lists that share their first messages;
- other layouts: a column mapping plus a Jinja prompt template over the row's fields.

Messages hold `role` and `content` (a string, or a list of parts: {"type": "text", "text"}
and {"type": "image"} placeholders, TRL's vision layout), and may hold `tool_calls`, `reasoning_content`, `name`
and `tool_call_id` (other keys are dropped; null ones count as absent, as Arrow fills them).
An assistant message with tool calls may lack content. Optional columns `tools` (function
schemas) and `chat_template_kwargs` (a dict), each also as a JSON string, ride along on the
Pair for the chat template.

Images (vision runs, `RowFormat.vision`): the `image_column` (default `image`) holds one image or a list of them
(TRL's `images`): raw values kept on the Pair, decoded later (shared/images.py). The prompt
refers to them by placeholders: `{"type": "image"}` parts in messages, the text `<image>` in a
string prompt; a string prompt without any gets one per image in front of it (RLAIF-V's
layout: LLaVA reads "<image>\n" + question). Another count of placeholders than of images
drops the row (`image_count_mismatch`).

A row that cannot be used raises `RowError` with one of `DROP_REASONS`; the caller counts it
and goes on. Nothing here knows about tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.sandbox

from refdpo.shared.images import IMAGE_DROP_REASONS
from refdpo.shared.sources import (  # noqa: F401 (re-exported: the loaders' public names)
    DataError,
    RowSource,
    _Malformed,
    load_source,
    split_holdout,
)

DROP_REASONS = {
    "malformed_line": "a JSON Lines line that is not a JSON object",
    "missing_field": "chosen, rejected or the prompt is absent or null",
    "wrong_type": "a field is not a string (or a list of messages where one is allowed), or "
    "tools / chat_template_kwargs are not a list / dict (or its JSON)",
    "bad_messages": "a message without string role/content, an unknown role, a mistyped "
    "tool_calls / reasoning_content / name / tool_call_id, or a non-assistant message in "
    "chosen/rejected",
    "prompt_mismatch": "chosen and rejected are full conversations whose shared first messages "
    "do not end in a user message equal to the prompt column",
    "template_error": "the prompt template or chat template failed on the row",
    "no_shared_prompt": "implicit-prompt row whose chosen and rejected share no prompt marker",
    "empty_prompt": "the prompt is empty or whitespace only",
    "empty_chosen": "the chosen response is empty or whitespace only",
    "empty_rejected": "the rejected response is empty or whitespace only",
    "identical": "chosen and rejected are the same",
    "prompt_too_long": "the prompt has more tokens than --max-prompt-length",
    "identical_after_truncation": "chosen and rejected are the same after truncation",
    "duplicate_id": "the pair id already appeared earlier in the dataset",
    "image_count_mismatch": "the prompt's image placeholders are not as many as the row's images",
    **IMAGE_DROP_REASONS,  # an image that cannot be read or decoded (shared/images.py)
    "nonfinite_logps": "the reference gave a NaN or inf log-prob (never written)",
}
ROLES = ("system", "user", "assistant", "tool")
IMAGE_PLACEHOLDER = "<image>"  # what a string prompt writes where an image goes
# keys a message may carry beside role and content, with their types
MESSAGE_KEYS = {"tool_calls": list, "reasoning_content": str, "name": str, "tool_call_id": str}


class RowError(Exception):
    """A row that is skipped: `reason` is a key of DROP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RowFormat:
    """Where a row's fields are and how to build its prompt."""

    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    id_column: str = "id"
    prompt_template: str | None = None  # Jinja over the row's fields, e.g. "Q: {{ question }}"
    prompt_marker: str = "\n\nAssistant:"  # implicit-prompt rows: the prompt ends after it
    chat_template: bool = False  # wrap string rows as user/assistant messages
    tools_column: str = "tools"  # function schemas for the chat template
    template_kwargs_column: str = "chat_template_kwargs"  # e.g. {"enable_thinking": false}
    image_column: str = "image"  # one image or a list of them (vision runs)
    vision: bool = False  # a vision-language model reads the images; text runs ignore them


Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Pair:
    """One usable preference pair (x, y_w, y_l), as text or as chat messages, with the
    row's tool schemas and chat-template options when it has them."""

    id: str
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    tools: list[dict] | None = None
    template_kwargs: dict | None = None
    images: tuple[Any, ...] = ()  # the image column's values, in placeholder order, undecoded

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.prompt, list)


# ---------------------------------------------------------------------------- row -> Pair


_JINJA = jinja2.sandbox.SandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True
)


def _without_nulls(value: Any) -> Any:
    """`value` with null-valued dict keys dropped at every depth: Arrow gives every struct all
    the keys any row has, the absent ones as null, so a null key is taken as never written."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _check_message(m: Any, field: str, assistant_only: bool) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise RowError("bad_messages", f"{field}: a message without a string role")
    out: dict[str, Any] = {"role": m["role"], "content": m.get("content")}
    for key, kind in MESSAGE_KEYS.items():
        value = m.get(key)
        if value is not None and not isinstance(value, kind):
            raise RowError("bad_messages", f"{field}: {key} is not a {kind.__name__}")
        if key == "tool_calls" and value:
            if not all(isinstance(call, dict) for call in value):
                raise RowError("bad_messages", f"{field}: a tool call that is not an object")
            value = _without_nulls(value)
        if value:  # an empty tool_calls list (or name) is the same as none
            out[key] = value
    if out["content"] is None and "tool_calls" in out and out["role"] == "assistant":
        out["content"] = ""  # an assistant turn that only calls tools
    if isinstance(out["content"], list):
        out["content"] = _check_parts(out["content"], field)
    elif not isinstance(out["content"], str):
        raise RowError("bad_messages", f"{field}: a message without string content")
    if out["role"] not in ROLES or (assistant_only and out["role"] != "assistant"):
        raise RowError("bad_messages", f"{field}: unexpected role {out['role']!r}")
    return out


def _check_parts(parts: list, field: str) -> list[dict[str, str]]:
    """A content list: text parts and image placeholders (an image part's own keys, such as
    TRL's inline `image`, are dropped: the images come from the image column)."""
    out = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            out.append({"type": "image"})
        else:
            raise RowError("bad_messages", f"{field}: a content part that is not text or image")
    return out


def content_text(content: str | list[dict[str, str]]) -> str:
    """A message's text: its string, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")


def count_placeholders(prompt: str | Messages) -> int:
    """Image placeholders in a prompt: image parts of its messages, or `<image>` in text."""
    if isinstance(prompt, str):
        return prompt.count(IMAGE_PLACEHOLDER)
    return sum(
        1 for m in prompt if isinstance(m["content"], list) for p in m["content"]
        if p["type"] == "image"
    )  # fmt: skip


def _check_messages(value: Any, field: str, assistant_only: bool) -> Messages:
    if not isinstance(value, list) or not value:
        raise RowError("bad_messages", f"{field} is not a non-empty list of messages")
    return [_check_message(m, field, assistant_only) for m in value]


def _split_text(chosen: str, rejected: str, marker: str) -> tuple[str, str, str]:
    """Implicit prompt: the shared beginning up to and including the last shared marker."""
    shared = os.path.commonprefix([chosen, rejected])  # noqa: RUF071 (character-wise is meant)
    cut = shared.rfind(marker)
    if cut < 0:
        raise RowError("no_shared_prompt", f"no shared {marker!r}")
    end = cut + len(marker)
    return chosen[:end], chosen[end:], rejected[end:]


def _shared_count(chosen: Messages, rejected: Messages) -> int:
    """How many first messages (already checked) the two lists share."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def _rest(messages: Messages, n: int, field: str) -> Messages:
    """An answer: the messages after the `n` prompt messages, all from the assistant."""
    if len(messages) <= n:
        raise RowError(f"empty_{field}", f"{field} holds only the prompt's messages")
    return [_check_message(m, field, assistant_only=True) for m in messages[n:]]


def _split_messages(chosen: Any, rejected: Any) -> tuple[Messages, Messages, Messages]:
    """Implicit prompt for message lists: the shared messages before the first differing one."""
    chosen = _check_messages(chosen, "chosen", assistant_only=False)
    rejected = _check_messages(rejected, "rejected", assistant_only=False)
    n = _shared_count(chosen, rejected)
    if n == 0:
        raise RowError("no_shared_prompt", "chosen and rejected share no first message")
    return chosen[:n], _rest(chosen, n, "chosen"), _rest(rejected, n, "rejected")


def _split_conversations(prompt: str, chosen: Any, rejected: Any) -> tuple[Messages, ...]:
    """A prompt string beside whole conversations (UltraFeedback): the conversations' shared
    first messages are the prompt, and must end in a user message saying the same."""
    chosen = _check_messages(chosen, "chosen", assistant_only=False)
    rejected = _check_messages(rejected, "rejected", assistant_only=False)
    if all(m["role"] == "assistant" for m in chosen + rejected):
        raise RowError("wrong_type", "a string prompt needs string answers or whole conversations")
    n = _shared_count(chosen, rejected)
    asked = [content_text(m["content"]) for m in chosen[:n] if m["role"] == "user"]
    if not asked or asked[-1].strip() != prompt.strip():
        raise RowError(
            "prompt_mismatch", "the conversations' shared user turn differs from the prompt"
        )
    return chosen[:n], _rest(chosen, n, "chosen"), _rest(rejected, n, "rejected")


def _answer(value: Any, prompt: Messages, field: str) -> Messages:
    """An answer to a message-list prompt; one that repeats the prompt first loses it."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    messages = _check_messages(value, field, assistant_only=False)
    n = len(prompt)
    if messages[:n] == prompt and any(m["role"] != "assistant" for m in prompt):
        return _rest(messages, n, field)
    return _rest(messages, 0, field)


def _is_blank(value: str | Messages) -> bool:
    """No text: a tool call or reasoning counts as text, as the chat template renders them."""
    if isinstance(value, str):
        return not value.strip()
    return not any(
        content_text(m["content"]).strip()
        or m.get("reasoning_content", "").strip()
        or m.get("tool_calls")
        for m in value
    )


def content_id(
    prompt: Any,
    chosen: Any,
    rejected: Any,
    tools: Any = None,
    template_kwargs: Any = None,
    images: tuple[str, ...] = (),
) -> str:
    """Stable id from a pair's content, for datasets without an id column. Tools, template
    options and images (their `image_key`s) enter only when present, so rows without them
    keep their old ids."""
    parts = [prompt, chosen, rejected]
    if tools is not None or template_kwargs is not None:
        parts.append({"tools": tools, "chat_template_kwargs": template_kwargs})
    if images:
        parts.append({"images": list(images)})
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _field(row: dict, name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise RowError("missing_field", f"no {name!r}")
    return value


def _prompt_of(row: dict, fmt: RowFormat) -> Any:
    if fmt.prompt_template is not None:
        try:
            # the row as one dict, not keywords: a column named `self` must not clash
            return _JINJA.from_string(fmt.prompt_template).render(row)
        except Exception as err:  # any template failure is this row's problem
            raise RowError("template_error", str(err)) from None
    return row.get(fmt.prompt_column)


def _json_column(row: dict, column: str, kind: type) -> Any:
    """An optional list / dict column, given as such or as its JSON text; empty is none."""
    value = row.get(column)
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as err:
            raise RowError("wrong_type", f"{column} is text but not JSON: {err}") from None
    if value is None:
        return None
    listed = kind is list and isinstance(value, list)
    if not isinstance(value, kind) or (listed and not all(isinstance(t, dict) for t in value)):
        want = "a list of objects" if kind is list else "an object"
        raise RowError("wrong_type", f"{column} is not {want}")
    return _without_nulls(value) or None


def _layout(prompt: Any, chosen: Any, rejected: Any, fmt: RowFormat) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of one of the accepted row formats, checked."""
    both_lists = isinstance(chosen, list) and isinstance(rejected, list)
    if prompt is None:  # implicit prompt
        if isinstance(chosen, str) and isinstance(rejected, str):
            return _split_text(chosen, rejected, fmt.prompt_marker)
        if not both_lists:
            raise RowError("wrong_type", "chosen/rejected must both be strings or message lists")
        return _split_messages(chosen, rejected)
    if isinstance(prompt, str) and both_lists:
        return _split_conversations(prompt, chosen, rejected)
    if isinstance(prompt, list):
        prompt = _check_messages(prompt, "prompt", assistant_only=False)
        return prompt, _answer(chosen, prompt, "chosen"), _answer(rejected, prompt, "rejected")
    if not all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        raise RowError("wrong_type", "prompt, chosen and rejected must be strings")
    return prompt, chosen, rejected


def image_key(value: Any) -> str:
    """What identifies an image before it is read: the sha256 of inline bytes, else its path
    as written (reading every file of a large corpus on every worker would cost more than
    storing one image twice under two paths). Any other value keys by its repr, which
    decoding then refuses (`image_bad_value`)."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if isinstance(data, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(data)).hexdigest()
    path = value.get("path") if isinstance(value, dict) else value
    if isinstance(path, str):
        return f"path:{path}"
    if hasattr(value, "tobytes") and hasattr(value, "size"):  # a decoded PIL image
        return hashlib.sha256(value.tobytes()).hexdigest()
    return f"value:{value!r}"[:200]


def row_images(row: dict, fmt: RowFormat) -> tuple[Any, ...]:
    """The row's images: none (column absent, null, empty list), one, or a list of them."""
    value = row.get(fmt.image_column)
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


def _with_images(prompt: Any, images: tuple[Any, ...]) -> Any:
    """The prompt, its placeholders checked against the images. A string prompt without
    any gets one `<image>` line per image in front (RLAIF-V's questions name no image)."""
    found = count_placeholders(prompt)
    if found == len(images):
        return prompt
    if found == 0 and isinstance(prompt, str):
        return f"{IMAGE_PLACEHOLDER}\n" * len(images) + prompt
    raise RowError(
        "image_count_mismatch", f"{found} placeholder(s) in the prompt, {len(images)} image(s)"
    )


def _as_chat(prompt: str, chosen: str, rejected: str, vision: bool) -> tuple[Messages, ...]:
    """String rows as a user turn and an assistant turn; with images, the user turn is a
    content list whose image parts stand where the text had `<image>`."""
    user: Any = prompt
    if vision:
        pieces = prompt.split(IMAGE_PLACEHOLDER)
        user = [{"type": "text", "text": pieces[0]}]
        for piece in pieces[1:]:
            user += [{"type": "image"}, {"type": "text", "text": piece}]
        user = [p for p in user if p["type"] == "image" or p["text"].strip()]
    return (
        [{"role": "user", "content": user}],
        [{"role": "assistant", "content": chosen}],
        [{"role": "assistant", "content": rejected}],
    )


def normalize_row(row: Any, fmt: RowFormat) -> Pair:
    """Validate one raw row and return its Pair, or raise RowError naming the reason."""
    if isinstance(row, _Malformed):
        raise RowError("malformed_line", f"{row.where}: {row.error}")
    if not isinstance(row, dict):
        raise RowError("malformed_line", f"row is a {type(row).__name__}, not an object")
    chosen, rejected = _field(row, fmt.chosen_column), _field(row, fmt.rejected_column)
    prompt, chosen, rejected = _layout(_prompt_of(row, fmt), chosen, rejected, fmt)
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if _is_blank(value):
            raise RowError(f"empty_{name}")
    if chosen == rejected:
        raise RowError("identical")
    tools = _json_column(row, fmt.tools_column, list)
    kwargs = _json_column(row, fmt.template_kwargs_column, dict)
    images = row_images(row, fmt) if fmt.vision else ()
    if fmt.vision:
        prompt = _with_images(prompt, images)

    raw_id = row.get(fmt.id_column)
    if raw_id is not None:
        pair_id = str(raw_id)
    else:
        keys = tuple(image_key(v) for v in images)
        pair_id = content_id(prompt, chosen, rejected, tools, kwargs, keys)
    if fmt.chat_template and isinstance(prompt, str):
        prompt, chosen, rejected = _as_chat(prompt, chosen, rejected, bool(images))
    return Pair(pair_id, prompt, chosen, rejected, tools, kwargs, images)
