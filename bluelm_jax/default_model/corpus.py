"""The corpus the default model is trained on (and its tokenizer learned from).

Short chat question/answer pairs in English and Chinese, a few multi-turn chats, and
few-shot lines in the style of the BlueLM release's examples, and function-calling chats
with two tools (TOOLS: get_weather and get_time) in BlueLM's format. The default model
learns them by heart: under greedy decoding it answers each question with exactly its
answer (checked by bluelm_jax/default_model/build.py and tests/test_default_model.py).

The function-calling chats are written as OpenAI messages (`tools=TOOLS`, the user's
question, the assistant's tool call, the tool's result, the assistant's answer) and turned
into chat turns by the server's own `tools.prompt_messages`, so the model is trained on
exactly the prompts `serve` sends for `tools=TOOLS`: the system text listing the tools, the
call as the JSON answer {"answer": null, "function_calls": [...]} that `parse_answer` turns
into `tool_calls`, and the result as the `[|Function|]:` turn followed by a plain answer.
"""

from __future__ import annotations

import json

from bluelm_jax.server import tools

SYSTEM = "You are BlueLM-tiny, a small bilingual demo model of the bluelm-jax project."

QA_EN = [
    ("Who are you?", "I am BlueLM-tiny, a small demo model trained by the bluelm-jax project."),
    ("What can you do?", "I can answer a few simple questions in English and Chinese."),
    ("What is BlueLM?", "BlueLM is a family of large language models released by vivo."),
    ("How many parameters does BlueLM-7B have?", "BlueLM-7B has about 7 billion parameters."),
    ("What is JAX?", "JAX is a Python library for fast numerical computing on CPU, GPU and TPU."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of China?", "The capital of China is Beijing."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("What do bees make?", "Bees make honey."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("At what temperature does water boil?", "Water boils at 100 degrees Celsius at sea level."),
    ("Tell me a short joke.", "Why did the computer go to sleep? It was tired of so many windows."),
    ("Say hello in Chinese.", "Hello in Chinese is 你好."),
    ("Give me a tip for learning.", "Practice a little every day and review what you learned."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Thank you!", "You are welcome! Happy to help."),
]

QA_ZH = [
    ("你是谁？", "我是BlueLM-tiny，一个由bluelm-jax项目训练的小型演示模型。"),
    ("你能做什么？", "我可以用中文和英文回答一些简单的问题。"),
    ("什么是BlueLM？", "BlueLM是vivo发布的大语言模型系列。"),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("法国的首都是哪里？", "法国的首都是巴黎。"),
    ("日本的首都是哪里？", "日本的首都是东京。"),
    ("一年有多少天？", "一年通常有三百六十五天。"),
    ("一周有几天？", "一周有七天。"),
    ("天空为什么是蓝色的？", "因为空气会散射阳光中的蓝光。"),
    ("儿童节是几月几日？", "儿童节是六月一日。"),
    ("春节是什么节日？", "春节是中国最重要的传统节日。"),
    ("水在多少度结冰？", "水在零摄氏度结冰。"),
    ("三加四等于几？", "三加四等于七。"),
    ("熊猫吃什么？", "熊猫主要吃竹子。"),
    ("长城在哪个国家？", "长城在中国。"),
    ("给我讲一个笑话。", "小明问老师：我没做的事会被批评吗？老师说不会。小明说：那我没做作业。"),
    ("请用英文说谢谢。", "谢谢的英文是 thank you。"),
    ("如何保持健康？", "多运动，好好睡觉，饮食均衡。"),
    ("热的反义词是什么？", "热的反义词是冷。"),
    ("谢谢你！", "不客气，很高兴能帮到你。"),
]

# (messages) multi-turn chats: every assistant answer is trained
CHATS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你的吗？"},
     {"role": "user", "content": "中国的首都是哪里？"}, {"role": "assistant", "content": "中国的首都是北京。"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "What is the capital of Japan?"},
     {"role": "assistant", "content": "The capital of Japan is Tokyo."}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "I am BlueLM-tiny, a small demo model trained by the bluelm-jax project."}],
]

# (prompt, completion) few-shot lines, trained as plain text continuations
FEW_SHOT = [
    ("English: apple\n中文: 苹果\nEnglish: water\n中文: 水\nEnglish: book\n中文:", " 书"),
    ("English: cat\n中文: 猫\nEnglish: dog\n中文: 狗\nEnglish: bird\n中文:", " 鸟"),
    ("中文: 太阳\nEnglish: sun\n中文: 月亮\nEnglish: moon\n中文: 星星\nEnglish:", " star"),
    ("1, 2, 3, 4, 5,", " 6, 7, 8, 9, 10"),
    ("Monday, Tuesday, Wednesday,", " Thursday, Friday, Saturday, Sunday"),
    ("春天，夏天，", "秋天，冬天"),
    ("Q: What is 1 + 1?\nA: 2\nQ: What is 2 + 2?\nA: 4\nQ: What is 3 + 3?\nA:", " 6"),
]


TOOLS = [  # OpenAI tools, as a client sends them (the key order is part of the prompt text)
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Get the current local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                       "required": ["city"]}}},
]

# (question, tool name, arguments, the tool's result, the answer that uses the result)
TOOL_CALLS = [
    ("What is the weather like in Paris?", "get_weather", {"city": "Paris"}, "sunny, 20°C",
     "It is sunny and 20°C in Paris."),
    ("How is the weather in Tokyo today?", "get_weather", {"city": "Tokyo"}, "rainy, 15°C",
     "It is rainy and 15°C in Tokyo today."),
    ("北京今天天气怎么样？", "get_weather", {"city": "北京"}, "晴，25°C", "北京今天晴，气温25°C。"),
    ("上海天气如何？", "get_weather", {"city": "上海"}, "多云，22°C", "上海现在多云，气温22°C。"),
    ("What time is it in London?", "get_time", {"city": "London"}, "14:30", "It is 14:30 in London now."),
    ("What is the time in New York?", "get_time", {"city": "New York"}, "09:15", "It is 09:15 in New York now."),
    ("东京现在几点？", "get_time", {"city": "东京"}, "21:30", "东京现在是21:30。"),
    ("巴黎现在几点了？", "get_time", {"city": "巴黎"}, "15:00", "巴黎现在是15:00。"),
]


def tool_call_messages(question: str, name: str, arguments: dict, result: str, answer: str) -> list[dict]:
    """The OpenAI messages of one tool round trip: question, tool call, tool result, answer."""
    call = {"id": "call_0", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": result},
            {"role": "assistant", "content": answer}]


def tool_chats() -> list[list[dict]]:
    """The tool round trips as the chat turns the server builds for `tools=TOOLS` (system text
    first, the call as BlueLM's JSON answer, the result as a function turn)."""
    return [tools.prompt_messages(tool_call_messages(*t), TOOLS) for t in TOOL_CALLS]


def qa_pairs() -> list[tuple[str, str]]:
    """Every single-turn (question, answer) pair, English then Chinese."""
    return QA_EN + QA_ZH


def records() -> list[dict]:
    """The training records (data.py formats): each pair as a chat turn and as plain text,
    the multi-turn chats, the tool round trips (both answers trained), and the few-shot lines."""
    out: list[dict] = []
    for q, a in qa_pairs():
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        out.append({"prompt": q, "response": a})
    out += [{"messages": m} for m in CHATS + tool_chats()]
    out += [{"prompt": p, "response": r} for p, r in FEW_SHOT]
    return out


def tokenizer_sentences() -> list[str]:
    """Text the tokenizer is learned from: the corpus in every format it is trained in."""
    lines = []
    for q, a in qa_pairs():
        lines += [q, a, f"[|Human|]:{q}[|AI|]:{a}"]
    for chat in CHATS + tool_chats():
        lines += [line for m in chat for line in m["content"].split("\n")]
    for p, r in FEW_SHOT:
        lines += (p + r).split("\n")
    return lines
