"""A small, byte-reproducible bilingual SentencePiece model with BlueLM's special pieces, for tests."""

from __future__ import annotations

import io

import sentencepiece as spm

CHAT_PIECES = ("[|Human|]:", "[|AI|]:", "[|SYSTEM|]:", "[|Function|]:")

_ENGLISH = [
    "Hello, how are you today?",
    "I am fine, thank you. How can I help you?",
    "What is the capital of France?",
    "The capital of France is Paris.",
    "Please translate this sentence into Chinese.",
    "Tell me a short story about a cat and a dog.",
    "Once upon a time, a small cat lived in a quiet village.",
    "The weather is sunny and warm in the morning.",
    "Write a poem about the sea and the moon.",
    "Machine learning models learn patterns from data.",
    "The quick brown fox jumps over the lazy dog.",
    "Can you explain how a transformer language model works?",
    "Attention lets every token look at the tokens before it.",
    "Function calls return JSON with an answer and parameters.",
    "What time is it in Beijing right now?",
    "There are 365 days in a year and 24 hours in a day.",
    "Thank you very much for your help!",
    "You are a helpful assistant that answers questions.",
]

_CHINESE = [
    "你好，今天过得怎么样？",
    "我很好，谢谢。有什么可以帮你的吗？",
    "法国的首都是哪里？",
    "法国的首都是巴黎。",
    "请把这句话翻译成英文。",
    "给我讲一个关于猫和狗的小故事。",
    "从前，一只小猫住在一个安静的村庄里。",
    "早上的天气晴朗又温暖。",
    "写一首关于大海和月亮的诗。",
    "机器学习模型从数据中学习规律。",
    "北京现在几点了？",
    "一年有三百六十五天，一天有二十四小时。",
    "非常感谢你的帮助！",
    "你是一个乐于助人的人工智能助手。",
    "请根据用户的问题选择合适的工具。",
    "深圳的天气怎么样？明天会下雨吗？",
]


def _corpus() -> list[str]:
    """Deterministic training sentences: plain text plus chat-formatted exchanges."""
    lines = list(_ENGLISH) + list(_CHINESE)
    pairs = list(zip(_ENGLISH, _CHINESE))
    for i, (en, zh) in enumerate(pairs):
        q, a = (en, zh) if i % 2 else (zh, en)
        lines.append(f"[|Human|]:{q}[|AI|]:{a}")
        lines.append(f"[|SYSTEM|]:{_ENGLISH[-1]}[|Human|]:{en} {zh}[|AI|]:{a}")
        lines.append(f'[|Function|]:{{"city": "深圳", "answer": "{en}"}}[|AI|]:{zh}')
    return lines * 3


def train_tokenizer(path: str, vocab_size: int = 600) -> str:
    """Trains the test tokenizer in memory, writes it to `path` and returns `path`."""
    spm.set_random_generator_seed(1234)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        user_defined_symbols=list(CHAT_PIECES),
        num_threads=1,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path
