"""BlueLM's function-calling format <-> OpenAI `tools`, `tool_calls` and tool messages.

BlueLM (Chat-32K) learned function calling from a system text that lists the tools and the
answer format, in Chinese, as the release's demos write it:

    你是一个AI助手，尽你所能回答用户的问题，你可以使用的工具如下:
    <APIs>
    - {tool 1 as a Python dict}
    - {tool 2 ...}
    </APIs>
    你需要根据用户问题，选择合适的工具，输出的格式为：
    {"answer":"给用户的回复","function_calls":[{"name":"函数名","parameters":{"参数名":"参数"}}]}
    如果不需要额外回复或者没有合适工具，则对应字段输出空。

("You are an AI assistant ... the tools you can use are:", the list, "choose the fitting tool
for the user's question; the output format is: ...", "if no extra reply or no fitting tool is
needed, leave that field empty."). Each tool is written as the `function` object of an OpenAI
tool ({"name", "description", "parameters"}), the fields the release's own tool list has.

The model answers with that JSON. `parse_answer` turns a JSON answer with function calls into
OpenAI `tool_calls` (arguments as a JSON string); any other text stays plain content. In the
prompt, an assistant turn that called tools is written back as that JSON (with its text, or
null, as the answer), and tool results (`role: "tool"`, or the legacy `"function"`) become the
`[|Function|]:` turn; consecutive results are joined by newlines into one turn.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from bluelm_jax.server.schema import bad_request

TOOLS_INTRO = "你是一个AI助手，尽你所能回答用户的问题，你可以使用的工具如下:\n<APIs>\n"
TOOLS_OUTRO = ("</APIs>\n你需要根据用户问题，选择合适的工具，输出的格式为：\n"
               '{"answer":"给用户的回复","function_calls":[{"name":"函数名","parameters":{"参数名":"参数"}}]}\n'
               "如果不需要额外回复或者没有合适工具，则对应字段输出空。\n")


def tool_functions(tools: list) -> list[dict]:
    """The `function` objects of OpenAI tools ({"type": "function", "function": {"name", ...}}); 400 otherwise."""
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                              param="tools")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise bad_request(f"tools[{i}].function.name must be a non-empty string", param="tools")
        functions.append(function)
    return functions


def tools_system_text(functions: list[dict]) -> str:
    """The system text listing `functions` and the answer format (see the module docstring)."""
    return TOOLS_INTRO + "".join(f"- {f}\n" for f in functions) + TOOLS_OUTRO


def _text_content(content: Any, i: int) -> str:
    """A message's content as text: a string, null, or a list of {"type": "text", "text"} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts", param="messages")


def _call_json(call: Any, i: int) -> dict:
    """{"name", "parameters"} of one OpenAI tool call of an assistant message."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(f"messages[{i}].tool_calls entries must have function.name", param="messages")
    arguments = function.get("arguments") or "{}"
    try:
        parameters = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        raise bad_request(f"messages[{i}]: the arguments of tool call {function['name']!r} are not JSON",
                          param="messages") from None
    return {"name": function["name"], "parameters": parameters}


def assistant_text(content: str, tool_calls: list, i: int) -> str:
    """An assistant turn that called tools, written as BlueLM's JSON answer."""
    calls = [_call_json(c, i) for c in tool_calls]
    return json.dumps({"answer": content or None, "function_calls": calls}, ensure_ascii=False)


def prompt_messages(messages: list, tools: Optional[list]) -> list[dict]:
    """OpenAI chat messages (and tools) as the {"role", "content"} list that `format_chat` takes:
    the tools text first in the system message, tool calls as JSON answers, tool results as one
    function turn. 400 on malformed messages (format_chat checks the order of the roles)."""
    out: list[dict] = []
    if tools:
        out.append({"role": "system", "content": tools_system_text(tool_functions(tools))})
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role", param="messages")
        role, content = m["role"], _text_content(m.get("content"), i)
        if role == "system" and out and out[-1]["role"] == "system" and i == 0:
            out[-1] = {"role": "system", "content": out[-1]["content"] + content}
        elif role in ("tool", "function"):
            if out and out[-1]["role"] == "function":  # results of parallel calls: one turn
                out[-1] = {"role": "function", "content": out[-1]["content"] + "\n" + content}
            else:
                out.append({"role": "function", "content": content})
        elif role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise bad_request(f"messages[{i}].tool_calls must be a list", param="messages")
            out.append({"role": "assistant", "content": assistant_text(content, m["tool_calls"], i)})
        else:
            out.append({"role": role, "content": content})
    return out


def _tool_call(call: dict) -> dict:
    """An OpenAI tool call of one of BlueLM's {"name", "parameters"}."""
    parameters = call.get("parameters")
    arguments = json.dumps(parameters if parameters is not None else {}, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": arguments}}


def parse_answer(text: str) -> tuple[Optional[str], Optional[list[dict]]]:
    """(content, tool_calls) of a model answer when tools were offered.

    JSON `{"answer": ..., "function_calls": [{"name", "parameters"}, ...]}` with at least one
    call gives its answer (None when empty) and the OpenAI tool calls; the same JSON without
    calls gives its answer as content; any other text is the content as it is, with no calls.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text, None
    if not isinstance(value, dict) or "function_calls" not in value:
        return text, None
    calls, answer = value.get("function_calls") or [], value.get("answer")
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"]
                                              for c in calls):
        return text, None
    if answer is not None and not isinstance(answer, str):
        answer = json.dumps(answer, ensure_ascii=False)
    if not calls:
        return (answer if answer is not None else text), None
    return (answer or None), [_tool_call(c) for c in calls]


def may_be_json(text: str) -> bool:
    """Whether streamed text could still turn out to be a JSON answer (its first non-space
    character is "{", or there is none yet): a stream with tools holds such text back."""
    stripped = text.lstrip()
    return not stripped or stripped[0] == "{"
