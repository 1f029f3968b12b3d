"""Chat on a dialogue model: a conversation as the text of a play, and the reply as the next speaker's turn.

The plays are `SPEAKER:\\nline\\n\\n` turns, so each message becomes a turn: `NAME:\\n` + its content + a blank
line, NAME being the message's `name` or its role's speaker (`--chat-speakers`, by default user=USER and
assistant=ASSISTANT). A system (or developer) message is the scene's opening text: its content and a blank line,
with no speaker. The reply starts as the assistant's turn (`ASSISTANT:\\n`) and ends at the blank line that ends
a turn (finish_reason "stop"). `jinja_template` is the same rendering as a Jinja chat template, served in
/tokenizer_info so that a client that renders chats itself (lm-evaluation-harness) gets the very same text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from chargpt.runtime import DEFAULT_SPEAKERS, SPEAKING_ROLES, name_problem, parse_speakers

__all__ = ["DEFAULT_SPEAKERS", "SCENE_ROLES", "SPEAKING_ROLES", "TURN_END", "jinja_template", "name_problem",
           "parse_speakers", "render"]  # fmt: skip

TURN_END = "\n\n"  # a blank line ends a speaker's turn
SCENE_ROLES = ("system", "developer")  # their content opens the scene, spoken by nobody


def render(messages: Sequence[Mapping[str, Any]], speakers: Mapping[str, str], add_generation_prompt: bool) -> str:
    """The conversation as the play's text (messages already checked: roles known, content a string)."""
    parts = []
    for m in messages:
        if m["role"] in SCENE_ROLES:
            parts.append(m["content"] + TURN_END)
        else:
            parts.append(f"{m.get('name') or speakers[m['role']]}:\n{m['content']}{TURN_END}")
    if add_generation_prompt:
        parts.append(f"{speakers['assistant']}:\n")
    return "".join(parts)


def jinja_template(speakers: Mapping[str, str]) -> str:
    """render() as a Jinja chat template (messages, add_generation_prompt), as Hugging Face tokenizers carry one."""
    names = json.dumps({role: speakers[role] for role in SPEAKING_ROLES})
    scene = json.dumps(list(SCENE_ROLES))
    reply = json.dumps(f"{speakers['assistant']}:\n")
    end = json.dumps(TURN_END)
    return (
        "{%- for m in messages -%}"
        f"{{%- if m['role'] in {scene} -%}}{{{{ m['content'] }}}}{{{{ {end} }}}}"
        f"{{%- else -%}}{{{{ m['name'] if m.get('name') else {names}[m['role']] }}}}{{{{ ':\\n' }}}}"
        f"{{{{ m['content'] }}}}{{{{ {end} }}}}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {reply} }}}}{{%- endif -%}}"
    )
