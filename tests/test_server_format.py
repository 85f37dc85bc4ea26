"""The server's request parsing, errors and BlueLM function-calling format, without a server."""

import json

import pytest

from bluelm_jax.server import schema, tools
from bluelm_jax.server.schema import APIError
from bluelm_jax.tokenizer import format_chat

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}


def error_of(call, *args):
    with pytest.raises(APIError) as e:
        call(*args)
    return e.value


# ------------------------------------------------------------------ tools


def test_tools_system_text_is_the_release_format():
    text = tools.tools_system_text(tools.tool_functions([WEATHER]))
    assert text == ("你是一个AI助手，尽你所能回答用户的问题，你可以使用的工具如下:\n<APIs>\n"
                    "- {'name': 'get_weather', 'description': 'weather of a city', 'parameters': "
                    "{'type': 'object', 'properties': {'city': {'type': 'string'}}}}\n"
                    "</APIs>\n你需要根据用户问题，选择合适的工具，输出的格式为：\n"
                    '{"answer":"给用户的回复","function_calls":[{"name":"函数名","parameters":{"参数名":"参数"}}]}\n'
                    "如果不需要额外回复或者没有合适工具，则对应字段输出空。\n")


def test_a_tool_round_trip_becomes_the_chat_template():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "20C"},
    ]
    prompt = format_chat(tools.prompt_messages(messages, [WEATHER]))
    system = tools.tools_system_text(tools.tool_functions([WEATHER]))
    assert prompt == ("[|SYSTEM|]:" + system + "Be brief."
                      "[|Human|]:Weather in Paris?[|AI|]:"
                      '{"answer": null, "function_calls": [{"name": "get_weather", "parameters": {"city": "Paris"}}]}</s>'
                      "[|Function|]:sunny\n20C[|AI|]:")


def test_text_parts_and_no_tools_give_the_plain_template():
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert format_chat(tools.prompt_messages(messages, None)) == "[|Human|]:Hi there[|AI|]:"


def test_a_json_answer_with_calls_becomes_tool_calls():
    content, calls = tools.parse_answer('{"answer": "", "function_calls": [{"name": "get_weather", '
                                        '"parameters": {"city": "北京"}}, {"name": "now", "parameters": {}}]}')
    assert content is None
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "北京"}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]


@pytest.mark.parametrize("text, content", [
    ("It is sunny.", "It is sunny."),  # not JSON
    ('{"answer": "hello", "function_calls": []}', "hello"),  # the format without a call: its answer
    ('{"answer": "x", "function_calls": [{"parameters": {}}]}',  # a call without a name: not a call
     '{"answer": "x", "function_calls": [{"parameters": {}}]}'),
    ('[1, 2]', "[1, 2]"),
    ('{"answer": "hi"', '{"answer": "hi"'),  # cut off
])
def test_other_answers_stay_content(text, content):
    assert tools.parse_answer(text) == (content, None)


def test_streamed_text_is_held_only_while_it_may_be_json():
    assert tools.may_be_json("") and tools.may_be_json("  ") and tools.may_be_json(' {"ans')
    assert not tools.may_be_json("Hello {") and not tools.may_be_json(" x")


@pytest.mark.parametrize("bad", [[{"type": "function"}], [{"type": "code_interpreter", "function": {"name": "f"}}],
                                 [{"type": "function", "function": {"name": ""}}], ["f"]])
def test_malformed_tools_are_400(bad):
    e = error_of(tools.prompt_messages, [{"role": "user", "content": "x"}], bad)
    assert e.status == 400 and e.param == "tools"


def test_tool_call_arguments_that_are_not_json_are_400():
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]
    e = error_of(tools.prompt_messages, messages, [WEATHER])
    assert e.status == 400 and "not JSON" in e.message


# ------------------------------------------------------------------ schema


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_a_body_that_is_not_a_json_object_is_400(raw):
    e = error_of(schema.parse_body, raw)
    assert e.status == 400 and e.body()["error"]["type"] == "invalid_request_error"


def test_another_model_name_is_404():
    schema.check_model({"model": "m"}, "m")
    schema.check_model({}, "m")
    e = error_of(schema.check_model, {"model": "gpt-4"}, "m")
    assert e.status == 404 and e.code == "model_not_found" and "gpt-4" in e.message


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5),
    ("top_k", -1), ("repetition_penalty", 0), ("seed", -1), ("seed", 2**32), ("n", 0), ("n", 99),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 1.5), ("stop", [""]), ("stop", 3),
    ("frequency_penalty", 0.5), ("logit_bias", {"1": 5}), ("stream", "yes"), ("logprobs", True),
    ("tool_choice", "required"),
])
def test_out_of_range_chat_options_are_400(field, value):
    body = {"messages": [{"role": "user", "content": "x"}], field: value}
    e = error_of(schema.parse_chat, body)
    assert e.status == 400 and e.param == field


def test_chat_defaults_are_the_release_demo_settings():
    s = schema.parse_chat({"messages": [{"role": "user", "content": "x"}]}).sampling
    assert (s.temperature, s.top_p, s.repetition_penalty, s.top_k, s.max_tokens, s.n) == (0.8, 0.8, 1.1, 0, None, 1)
    assert 0 <= s.seed < 2**32


def test_completion_options():
    c = schema.parse_completion({"prompt": [5, 6, 7], "max_tokens": 0, "echo": True, "logprobs": 3, "seed": 4})
    assert c.prompts == [[5, 6, 7]] and c.echo and c.logprobs == 3 and c.sampling.max_tokens == 0
    assert c.sampling.choice_seed(1) == 5
    assert schema.parse_completion({"prompt": ["a", [1, 2]]}).prompts == ["a", [1, 2]]
    assert schema.parse_completion({"prompt": "a"}).sampling.max_tokens == schema.COMPLETION_MAX_TOKENS
    for bad in ({"prompt": ""}, {"prompt": []}, {"prompt": [[]]}, {"prompt": "a", "logprobs": 99},
                {"prompt": "a", "max_tokens": -1}, {"prompt": "a", "stream_options": {"include_usage": True}}):
        assert error_of(schema.parse_completion, bad).status == 400


def test_the_context_check_states_both_numbers():
    assert schema.new_token_budget(10, None, 2048) == 2038
    assert schema.new_token_budget(10, 100, 2048) == 100
    e = error_of(schema.new_token_budget, 3000, None, 2048)
    assert e.status == 400 and "3000" in e.message and "2048" in e.message
    e = error_of(schema.new_token_budget, 2000, 100, 2048)
    assert e.status == 400 and "2000" in e.message and "100" in e.message and "2048" in e.message
