"""200 varied test strings for tokenizer comparisons, the same on every run (seeded, no network).

The hand-written strings cover one kind of text each (code in several languages, emoji with ZWJ sequences and
skin tones, CJK / Japanese / Korean / Arabic / Hindi / Thai, combining accents, runs of spaces, tabs and newlines,
digit runs of every length up to 20, punctuation runs, URLs, contractions in several cases, special-token text
inside text); the rest are seeded mixes of fragments of those kinds joined by varied whitespace.
"""

from __future__ import annotations

import random

N_STRINGS = 200
SEED = 35

CODE = [
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "fn main() {\n\tprintln!(\"{:?}\", vec![1, 2, 3]);\n}",
    "const add = (a, b) => a + b;\nconsole.log(add(2, 40));",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "#include <stdio.h>\nint main(void){printf(\"%d\\n\",42);return 0;}",
    "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hi\") }",
    "if [[ -z \"$HOME\" ]]; then echo 'no home' >&2; exit 1; fi",
    "<div class=\"x\"><a href='#top'>Top</a></div>",
    "{\"key\": [1, 2.5e-3, null, true], \"nested\": {\"a\": \"b\"}}",
    "    \tindented_with_mixed = {'tabs': '\\t', 'spaces': '    '}",
    "x=a&&b||!c;y=x?1:0;z>>=2;w<<=3;v**=4;u//=5",
    "public static void main(String[] args) throws IOException {}",
    "lambda xs: [y for y in xs if y % 2 == 0]",
    "$ git commit -m \"fix: don't crash\" && git push origin HEAD:main",
]
EMOJI = [
    "😀😃😄 smile", "👍🏻👍🏼👍🏽👍🏾👍🏿", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "❤️‍🔥 heart on fire",
    "🇫🇷🇯🇵🇺🇸", "🧑🏽‍💻 coder", "✨🎉🎊", "👩‍❤️‍💋‍👨", "1️⃣2️⃣#️⃣", "🤷‍♀️🤦🏻‍♂️", "⌚⏰☕",
]
SCRIPTS = [
    "中文测试，你好世界！", "東京は日本の首都です。カタカナとひらがな。", "한국어 문장입니다. 안녕하세요?",
    "مرحبا بالعالم، كيف حالك؟", "नमस्ते दुनिया, आप कैसे हैं?", "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่าง",
    "Привет, мир! Ёжик в тумане.", "Γειά σου Κόσμε· αβγ ΑΒΓ", "שלום עולם", "ქართული ენა", "Ελληνικά και 日本語 mixed",
    "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３", "繁體中文與简体中文", "ㄅㄆㄇㄈ 注音", "ßẞ İı ǅǆ ﬁﬂ",
]
ACCENTS = [
    "café naïve résumé", "cafe\u0301 nai\u0308ve", "Zoë Ågren Øster", "e\u0301\u0302\u0303 stacked marks",
    "Ångström vs A\u030angstro\u0308m", "ṩ ḍ ệ ǖ", "देवनागरी में मात्राएँ", "a\u0300b\u0301c\u0302",
]
WHITESPACE = [
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \r\n \r\n", "\t\t\tx", "x\t\t\t", "   leading", "trailing   ",
    "a  b   c    d     e", "line1\nline2\r\nline3\n\n\nline4", " \n \n ", "\u00a0nbsp\u00a0here", "tab\tand space \t ",
    "\u3000ideographic\u3000space", "x \n\ty", "\n    indented block\n        deeper\n",
]
DIGITS = ["".join(str((i * 7 + k) % 10) for k in range(n)) for i, n in enumerate(range(1, 21))] + [
    "3.14159", "1,000,000", "-42", "+1 (555) 010-9999", "0x1F 0b1010 0o17", "1e-10", "2024-06-01T12:34:56Z",
    "v1.2.3-rc4", "١٢٣ ٤٥٦", "१२३४", "①②③", "½ ¾ ²³",
]
PUNCT = [
    "Hello, world!", "What?!?! No...", "--- *** ___ ===", "(((nested)))", "«quotes» „German“ “curly” ‘single’",
    "a/b\\c|d", "100% @user #tag $5 ^_^ ~tilde~", "…—–·•", "!!!???", "¿Qué? ¡Sí!", "<<>> [[]] {{}}",
]
URLS = [
    "https://example.com/path?q=1&lang=en#frag", "http://127.0.0.1:8080/api/v2/items/", "mailto:a.b+c@mail.example.org",
    "ftp://files.example.net/pub/file_v2.tar.gz", "www.example.co.uk/index.html",
]
CONTRACTIONS = [
    "it's they're we'll I'd you've I'm don't", "IT'S THEY'RE WE'LL I'D YOU'VE I'M DON'T", "It'S tHeY'Re We'Ll",
    "'s 're 'll 've 'm 'd 't", "rock 'n' roll, 'quoted', o'clock", "y'all'd've", "The dog's bone's dogs' bones",
]
SPECIAL_TEXT = [
    "<|im_start|>user\nhi<|im_end|>", "text <|endoftext|> more", "<s> start </s> end", "<|begin_of_text|>x<|eot_id|>",
    "<|user|>\nq<|end|>\n<|assistant|>", "[INST] do it [/INST]", "<unk> <pad> <mask>", "<|im_start|><|im_start|>",
    "almost <|im_start| special", "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
]
MIXED_FRAGMENTS = [*(c[:40] for c in CODE), *EMOJI, *SCRIPTS, *ACCENTS, *DIGITS[:20], *PUNCT, *URLS,
                   *CONTRACTIONS, *SPECIAL_TEXT[:6], "word", "Word", "WORD", "lorem ipsum dolor"]
SEPARATORS = [" ", "  ", "\t", "\n", "\r\n", "", " \n", "\n\n", "   ", "\t "]


def tokenizer_strings(n: int = N_STRINGS, seed: int = SEED) -> list[str]:
    """`n` strings: every hand-written one first, then seeded mixes of 2-5 fragments (no duplicates)."""
    fixed = [*CODE, *EMOJI, *SCRIPTS, *ACCENTS, *WHITESPACE, *DIGITS, *PUNCT, *URLS, *CONTRACTIONS, *SPECIAL_TEXT]
    out = list(dict.fromkeys(fixed))[:n]
    rng = random.Random(seed)
    seen = set(out)
    while len(out) < n:
        parts = rng.sample(MIXED_FRAGMENTS, rng.randint(2, 5))
        s = parts[0]
        for p in parts[1:]:
            s += rng.choice(SEPARATORS) + p
        if rng.random() < 0.2:
            s = rng.choice(SEPARATORS[:5]) + s
        if rng.random() < 0.2:
            s += rng.choice(SEPARATORS[:5])
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


if __name__ == "__main__":
    for s in tokenizer_strings():
        print(repr(s))
