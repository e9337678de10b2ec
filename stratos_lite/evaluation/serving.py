"""What a served GGUF will be prompted with, checked against the prompt the model was trained on.

A server does not use our prompt builder: llama.cpp formats a chat with the template embedded in the GGUF,
llama-cpp-python renders that template with Jinja, and Ollama renders the Modelfile's Go TEMPLATE. Each
is rendered here for the same (system, user) messages and tokenized with the GGUF's own vocabulary; any
difference from our prompt ids means served prompts differ from training prompts, so it is reported
loudly. A changed template and changed tokenizer metadata (tokens, merges, token types) both show up.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..model.tokenizer import Message, Tokenizer


@dataclass(frozen=True)
class PromptCheck:
    server: str  # who builds the prompt this way
    ok: bool
    detail: str  # where the first difference is, or why the check could not run

    def to_dict(self) -> dict:
        return asdict(self)


def first_difference(ours: Sequence[int], theirs: Sequence[int]) -> int | None:
    """The first position where two id sequences differ (or where one ends early), None when equal."""
    for index, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return index
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def _compare(server: str, ours: list[int], theirs: list[int], detokenize) -> PromptCheck:
    index = first_difference(ours, theirs)
    if index is None:
        return PromptCheck(server, True, f"{len(ours)} tokens, identical")
    near = slice(max(0, index - 3), index + 3)
    return PromptCheck(server, False, f"differs at token {index} of {len(ours)}: ours {ours[near]} "
                                      f"({detokenize(ours[near])!r}), served {theirs[near]} "
                                      f"({detokenize(theirs[near])!r}); lengths {len(ours)} vs {len(theirs)}")


# Ollama's Go templates, the subset a chat Modelfile uses ------------------------------------------------------

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.DOTALL)


def _go_template_tokens(template: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) pieces, with Go's trim markers applied: `{{-` eats the whitespace
    before the action, `-}}` the whitespace after it."""
    pieces: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        pieces += [("text", text), ("action", match.group(2))]
        position, trim_next = match.end(), bool(match.group(3))
    tail = template[position:]
    pieces.append(("text", tail.lstrip() if trim_next else tail))
    return pieces


def render_go_template(template: str, values: dict) -> str:
    """Render the Go text/template subset that chat Modelfiles use: text, `{{ .Field }}`,
    `{{ if .Field }}...{{ else }}...{{ end }}` and `{{ range .Messages }}...{{ end }}` (inside which
    `.Role` and `.Content` are the message's). Anything else raises ValueError."""
    pieces = _go_template_tokens(template)
    output, end = _render(pieces, 0, values)
    if end != len(pieces):
        raise ValueError(f"unexpected {{{{ {pieces[end][1]} }}}} in the template")
    return output


def _field(action: str, scope: dict):
    if not re.fullmatch(r"\.\w+", action):
        raise ValueError(f"unsupported template action {{{{ {action} }}}}")
    return scope.get(action[1:], "")


def _render(pieces, start: int, scope: dict) -> tuple[str, int]:
    """Render from `start` until an unmatched `end`/`else` (or the end); returns (text, index of it)."""
    out, index = [], start
    while index < len(pieces):
        kind, value = pieces[index]
        if kind == "text":
            out.append(value)
            index += 1
        elif value in ("end", "else"):
            return "".join(out), index
        elif value.startswith(("if ", "range ")):
            word, _, argument = value.partition(" ")
            subject = _field(argument.strip(), scope)
            body, stop = _render(pieces, index + 1, scope)
            if stop == len(pieces):
                raise ValueError(f"{{{{ {value} }}}} has no {{{{ end }}}}")
            otherwise, stop = (_render(pieces, stop + 1, scope) if pieces[stop][1] == "else" else ("", stop))
            if word == "if":
                out.append(body if subject else otherwise)
            else:
                out.extend(_render(pieces, index + 1, {**scope, **item})[0] for item in subject or ())
            index = stop + 1
        else:
            out.append(str(_field(value, scope)))
            index += 1
    return "".join(out), index


def read_modelfile(path: Path) -> dict[str, str]:
    """The TEMPLATE and SYSTEM of a Modelfile (triple-quoted or single-line values)."""
    text = path.read_text()
    values = {}
    for key in ("TEMPLATE", "SYSTEM"):
        match = re.search(rf'^{key}\s+"""(.*?)"""', text, re.DOTALL | re.MULTILINE) or \
            re.search(rf"^{key}\s+(.*)$", text, re.MULTILINE)
        if match:
            values[key] = match.group(1)
    return values


def ollama_prompt(modelfile: Path, messages: Sequence[Message]) -> str:
    """The prompt Ollama builds from the Modelfile for a chat request with `messages`: the Modelfile's
    SYSTEM is added when the request has no system message, and the template sees every system message
    both joined in .System and in .Messages, as Ollama's template.Execute passes them."""
    values = read_modelfile(modelfile)
    if "TEMPLATE" not in values:
        raise ValueError(f"{modelfile}: no TEMPLATE")
    chat = [{"Role": m.role, "Content": m.content} for m in messages]
    if "SYSTEM" in values and not any(m["Role"] == "system" for m in chat):
        chat.insert(0, {"Role": "system", "Content": values["SYSTEM"]})
    system = "\n\n".join(m["Content"] for m in chat if m["Role"] == "system")
    return render_go_template(values["TEMPLATE"], {"System": system, "Messages": chat})


# The checks ------------------------------------------------------------------------------------------------

def _llama_cpp_builtin_format(llama_cpp, template: str, messages: Sequence[Message]) -> str:
    """llama.cpp's own chat formatting (llama_chat_apply_template, what llama-cli and llama-server use
    without --jinja), given the template embedded in the GGUF."""
    keep = [(m.role.encode(), m.content.encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
    size = 4 * sum(len(r) + len(c) for r, c in keep) + 256
    buffer = ctypes.create_string_buffer(size)
    written = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(keep), True, buffer, size)
    if written < 0:
        raise ValueError("llama.cpp does not recognise the embedded chat template")
    if written > size:
        buffer = ctypes.create_string_buffer(written)
        written = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(keep), True, buffer, written)
    return buffer.raw[:written].decode()


def served_prompt_checks(llm, tokenizer: Tokenizer, messages: Sequence[Message],
                         modelfile: Path | None = None) -> list[PromptCheck]:
    """Each way a server formats `messages` for the GGUF loaded in `llm` (a llama_cpp.Llama), tokenized by
    the GGUF's own vocabulary, against our inference prompt ids."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    ours = tokenizer.encode_prompt(messages)
    template = llm.metadata.get("tokenizer.chat_template")
    detokenize = lambda ids: llm.detokenize(ids, special=True).decode("utf-8", "replace")
    served = lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    checks = [_compare("our prompt, tokenized by the GGUF's vocabulary", ours,
                       served(tokenizer.decode(ours)), detokenize)]
    if template is None:
        return [*checks, PromptCheck("llama.cpp chat template", False, "the GGUF carries no chat template")]
    renderers = {
        "llama.cpp chat formatting (embedded template)": lambda: _llama_cpp_builtin_format(llama_cpp, template,
                                                                                              messages),
        "llama-cpp-python Jinja (embedded template)": lambda: Jinja2ChatFormatter(
            template, eos_token=tokenizer.decode([tokenizer.eos_id]), bos_token="")(
            messages=[{"role": m.role, "content": m.content} for m in messages]).prompt,
    }
    if modelfile is not None:
        renderers["Ollama (Modelfile TEMPLATE)"] = lambda: ollama_prompt(modelfile, messages)
        users = [m for m in messages if m.role != "system"]
        renderers["Ollama (Modelfile TEMPLATE + SYSTEM, user turn only)"] = lambda: ollama_prompt(modelfile, users)
    for server, render in renderers.items():
        try:
            checks.append(_compare(server, ours, served(render()), detokenize))
        except Exception as error:  # a template the renderer rejects is a failed check, reported as such
            checks.append(PromptCheck(server, False, f"could not render: {error}"))
    return checks
