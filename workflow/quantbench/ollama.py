"""Ready to run in Ollama: a Modelfile beside each GGUF cell's file (`ollama create NAME -f Modelfile`).

The chat template is read from the GGUF's metadata (`tokenizer.chat_template`, Jinja) and written in
Ollama's Go template syntax for the families recognized by their turn markers. Any other template is
not guessed at: the Modelfile then has no TEMPLATE, and Ollama does what its documentation says for
an imported GGUF: it matches the file's own chat template against the templates it knows, and
otherwise sends prompts as they are (`{{ .Prompt }}`). A GGUF without a chat template (a base model)
gets `{{ .Prompt }}` itself. A system prompt the Jinja template supplies when a chat has none becomes
the Modelfile's SYSTEM, unless the config's `ollama.system` replaces it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import io

DEFAULT_MAX_CTX = 8192  # num_ctx: the model's trained context, at most this unless the config says


@dataclass(frozen=True)
class ChatFamily:
    name: str
    marker: str            # a turn marker its Jinja template writes, by which it is recognized
    template: str          # the same turns in Ollama's template syntax
    stop: tuple[str, ...]  # the markers that end the assistant's turn
    default_system: str = ""  # a system turn the Jinja template writes when the chat has none: its text is group 1

    def system_of(self, chat_template: str) -> str | None:
        """The system prompt the Jinja template supplies itself (SmolLM2's, Qwen2.5's), as literal text."""
        found = self.default_system and re.search(self.default_system, chat_template)
        return found.group(1) if found else None


FAMILIES = (
    ChatFamily("chatml", "<|im_start|>",
               "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n",
               ("<|im_start|>", "<|im_end|>"), default_system=r"<\|im_start\|>system\n([^{}'\"]+?)<\|im_end\|>"),
    ChatFamily("llama3", "<|start_header_id|>",
               "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ChatFamily("gemma", "<start_of_turn>",
               "{{- range $i, $_ := .Messages }}<start_of_turn>"
               "{{- if eq .Role \"user\" }}user{{ if and $.System (eq $i 0) }}\n{{ $.System }}{{ end }}"
               "{{- else }}model{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
               ("<start_of_turn>", "<end_of_turn>")),
    ChatFamily("mistral", "[INST]",
               "{{- range $i, $_ := .Messages }}"
               "{{- if eq .Role \"user\" }}[INST] {{ if and $.System (eq (len (slice $.Messages $i)) 1) }}"
               "{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"
               "{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>{{ end }}{{ end }}",
               ("[INST]", "[/INST]")),
)


def chat_family(chat_template: str | None) -> ChatFamily | None:
    return next((f for f in FAMILIES if chat_template and f.marker in chat_template), None)


def gguf_metadata(gguf: str) -> dict:
    """What a Modelfile needs of a GGUF: its chat template, trained context, token texts and EOS."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf)

    def value(key):
        field = reader.get_field(key)
        return field.contents() if field else None

    arch = value("general.architecture")
    tokens = value("tokenizer.ggml.tokens") or []
    eos = value("tokenizer.ggml.eos_token_id")
    return {"chat_template": value("tokenizer.chat_template"), "context_length": value(f"{arch}.context_length"),
            "tokens": tokens, "eos": tokens[eos] if eos is not None and eos < len(tokens) else None}


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError(f"cannot write {text!r} in a Modelfile: it contains \"\"\"")
    return f'"""{text}"""'


def write(gguf: str, out: str, settings: dict) -> dict:
    """The Modelfile of `gguf` at `out` (beside it); returns what it says, for the cell's record.
    settings: the config's `ollama` section (num_ctx, system, parameters)."""
    meta = gguf_metadata(gguf)
    family = chat_family(meta["chat_template"])
    num_ctx = settings.get("num_ctx") or min(meta["context_length"] or DEFAULT_MAX_CTX, DEFAULT_MAX_CTX)
    vocab = set(meta["tokens"])
    stops = [s for s in family.stop if s in vocab] if family else [meta["eos"]] if meta["eos"] else []
    lines = [f"# ollama create <name> -f {out}", f"FROM ./{os.path.relpath(gguf, Path(out).parent)}"]
    if family:
        lines.append(f"# the GGUF's chat template ({family.name}), in Ollama's syntax")
        lines.append(f"TEMPLATE {_quoted(family.template)}")
    elif meta["chat_template"]:
        lines.append("# the GGUF's chat template is none quantbench translates: Ollama matches it against the "
                     "templates it knows, else sends prompts as they are")
    else:
        lines.append("# no chat template in the GGUF (a base model): prompts go in as they are")
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    for name, value in settings.get("parameters", {}).items():
        lines.append(f"PARAMETER {name} {json.dumps(value) if isinstance(value, str) else value}")
    system = settings.get("system") or family and family.system_of(meta["chat_template"])
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    with io.atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"template": family.name if family else None, "stop": stops, "num_ctx": num_ctx, "system": system or None}


def parse(modelfile: str) -> dict:
    """A Modelfile's instructions, as Ollama reads them: FROM, TEMPLATE and SYSTEM (a \"\"\"-quoted value may
    span lines), and PARAMETER name value (given again, a parameter adds a value, as stop does)."""
    out: dict = {"parameters": {}}
    lines = iter(Path(modelfile).read_text(encoding="utf-8").split("\n"))
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        command, _, value = line.strip().partition(" ")
        if value.startswith('"""'):
            value = value[3:]
            while '"""' not in value:
                value += "\n" + next(lines)
            value = value[:value.index('"""')]
        if command.upper() == "PARAMETER":
            name, _, raw = value.partition(" ")
            out["parameters"].setdefault(name, []).append(json.loads(raw) if raw.startswith('"') else raw)
        else:
            out[command.upper()] = value
    return out
