"""Unsupported-content check: numbers, amounts, years, centuries and names in generated text that its source lacks.

A small model asked to summarize an article about £40m may write "$40 million", or date a building to a
century the article never names. Such output reads well and is wrong, so the task verbs, the server and
`eval` compare each output with its source and report what it adds. The check is lexical, not semantic:
it finds invented facts of these surface kinds, never wrong relations between facts that are all in the
source (who did what, negation, which number belongs to which thing). See docs/generation.md.

Harmless variants are matched: "1,000" == "1000" == "1.000" (Spanish style), "2.5 million" == "2,500,000" ==
"2.5m", "three" == "3", "£5" == "5 pounds" == "GBP 5", "19th century" == "nineteenth century" (and a year of
that century in the source supports it), a name whose words all occur in the source in any case ("Prime
Minister Johnson" against "the prime minister, Boris Johnson"), and an acronym against the initials of a
capitalised name ("UN" against "United Nations", and back).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

KINDS = ("number", "amount", "year", "century", "name")
NUMBER_KINDS = ("number", "amount", "year", "century")  # what `translate` checks: names change across languages

_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                     "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}
_WORDS.update({w: 10 * (i + 3) for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split())})
_WORDS.update({"hundred": 100, "thousand": 1000, "dozen": 12})
_NOT_CLAIMS = {"zero", "one", "hundred", "thousand", "dozen"}  # "one of", "a hundred ways": too vague to flag
_ORDINALS = {w: i + 1 for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth "
    "fifteenth sixteenth seventeenth eighteenth nineteenth twentieth twenty-first".split())}
_SCALES = {"thousand": 1e3, "k": 1e3, "million": 1e6, "m": 1e6, "mn": 1e6, "billion": 1e9, "bn": 1e9, "b": 1e9,
           "trillion": 1e12, "tn": 1e12}
# currency -> symbols, codes and words that name it
_CURRENCIES = {
    "GBP": ("£", "gbp", "pound", "pounds", "sterling", "pence", "p"),
    "USD": ("$", "us$", "usd", "dollar", "dollars"),  # not "cent": "per cent" is no currency
    "EUR": ("€", "eur", "euro", "euros"),
    "JPY": ("¥", "jpy", "yen"),
    "INR": ("₹", "inr", "rupee", "rupees", "rs"),
    "CHF": ("chf", "franc", "francs"),
}
_CUR_OF = {name: cur for cur, names in _CURRENCIES.items() for name in names}
_SYMBOLS = "|".join(re.escape(s) for s in sorted((n for n in _CUR_OF if not n.isalpha()), key=len, reverse=True))
_CODES = "|".join(n for n in _CUR_OF if n.isalpha() and len(n) == 3 or n == "rs")  # before a number: GBP 5
_UNITS = "|".join(sorted((n for n in _CUR_OF if n.isalpha()), key=len, reverse=True))  # after it: 5 pounds, 50p

_NUM = r"\d+(?:[.,]\d+)*"
_SCALE = r"(?:\s*(?:thousand|million|billion|trillion|bn|mn|tn|m|k|b)\b)?"
_AMOUNT_BEFORE = re.compile(rf"(?:(?<![\w$£€¥₹])({_SYMBOLS})\s?|\b({_CODES})\s)({_NUM})({_SCALE})", re.I)
_AMOUNT_AFTER = re.compile(rf"(?<![\w.,])({_NUM})({_SCALE})\s*({_UNITS})\b", re.I)
_CURRENCY_WORD = re.compile(rf"(?:{_SYMBOLS})|\b(?:{_UNITS.replace('|p|', '|')})\b", re.I)
_CENTURY = re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)[\s-]+century|\b([a-z]+(?:-first)?)[\s-]+century", re.I)
_DECADE = re.compile(r"\b(1[0-9]|20)(\d)0s\b")
_NUMBER = re.compile(rf"(?<![\w.,])({_NUM})(?:st|nd|rd|th)?({_SCALE})(?![\w])", re.I)
_NUMWORD = re.compile(r"\b(" + "|".join(sorted(_WORDS, key=len, reverse=True)) + r")\b", re.I)
_LIST_MARKER = re.compile(r"^\s*(\d+)[.)]\s", re.M)

# Capitalised words that are not names, wherever they stand (titles, determiners, pronouns, weekdays are kept).
_NOT_NAMES = set("""a an the this that these those there here it its he she they we you i me my our your his her their
them us mr mrs ms miss dr prof sir st mt and or but if when while after before as at by for from in into of on
to with without about over under also however although though because so then thus yet according summary
answer context question document text translation note overall i'm i've i'd i'll""".split()) | {
    n for n in _CUR_OF if n.isalpha()}  # GBP, USD: currencies, checked as amounts
_JOINERS = {"of", "the", "for", "de", "van", "von", "da", "du", "la", "le", "del", "&"}  # Bank of England


@dataclass(frozen=True)
class Unsupported:
    """One item of the generated text that its source does not contain."""

    kind: str  # number | amount | year | century | name
    text: str  # as written in the generated text


def _values(num: str, scale: str = "") -> set[float]:
    """Every reading of a written number: "1,000" -> {1000}, "1.000" -> {1.0, 1000}, "2,5" -> {2.5, 25}."""
    s = num.strip()
    out: set[float] = set()
    grouped = re.fullmatch(r"\d{1,3}(?:([.,])\d{3})+", s)
    if grouped:  # 1,000 or 1.000: thousands groups in English or Spanish style, never 1.0
        out.add(float(s.replace(grouped.group(1), "")))
    elif s.count(".") <= 1 and "," not in s:
        out.add(float(s))
    elif s.count(",") == 1 and "." not in s:  # decimal comma: 2,5
        out.add(float(s.replace(",", ".")))
    elif "," in s and s.count(".") == 1 and s.index(",") < s.index("."):  # 1,234.5
        out.add(float(s.replace(",", "")))
    elif "." in s and s.count(",") == 1 and s.index(".") < s.index(","):  # 1.234,5
        out.add(float(s.replace(".", "").replace(",", ".")))
    scale = scale.strip().lower()
    scaled = {round(v * _SCALES.get(scale, 1.0), 6) for v in out}
    return scaled | {round(v, 6) for v in out} if scale in ("m", "k", "b") else scaled  # 100m may be metres


def _century_of(word: str) -> int | None:
    w = word.lower()
    return int(w) if w.isdigit() else _ORDINALS.get(w)


@dataclass
class _Facts:
    """What a text states, in normalised form."""

    numbers: dict[str, set[float]]  # written form -> readings
    amounts: dict[str, tuple[str, set[float]]]  # written form -> (currency, readings)
    currencies: dict[str, str]  # written symbol/word -> currency, outside amounts too
    centuries: dict[str, int]
    decades: dict[str, int]  # "1990s" -> 199
    years: set[int]


def _facts(text: str, skip_list_markers: bool = False) -> _Facts:
    taken: list[tuple[int, int]] = []  # spans already read as amounts or centuries

    def free(m: re.Match) -> bool:
        return not any(a < m.end() and m.start() < b for a, b in taken)

    amounts: dict[str, tuple[str, set[float]]] = {}
    for m in _AMOUNT_BEFORE.finditer(text):
        cur = _CUR_OF[(m.group(1) or m.group(2)).lower()]
        amounts[m.group(0).strip()] = (cur, _values(m.group(3), m.group(4)))
        taken.append(m.span())
    for m in _AMOUNT_AFTER.finditer(text):
        if free(m):
            word = m.group(3).lower()
            cur = _CUR_OF[word]
            vals = _values(m.group(1), m.group(2))
            if word in ("p", "pence"):  # 50p == £0.50
                vals |= {round(v / 100, 6) for v in vals}
            amounts[m.group(0).strip()] = (cur, vals)
            taken.append(m.span())
    currencies = {m.group(0): _CUR_OF[m.group(0).lower()] for m in _CURRENCY_WORD.finditer(text)}
    centuries: dict[str, int] = {}
    for m in _CENTURY.finditer(text):
        n = _century_of(m.group(1) or m.group(2))
        if n:
            centuries[m.group(0)] = n
            taken.append(m.span())
    decades = {m.group(0): int(m.group(1) + m.group(2)) for m in _DECADE.finditer(text)}
    taken += [m.span() for m in _DECADE.finditer(text)]
    markers = {m.start(1) for m in _LIST_MARKER.finditer(text)} if skip_list_markers else set()
    numbers: dict[str, set[float]] = {}
    for m in _NUMBER.finditer(text):
        if free(m) and m.start() not in markers:
            numbers[m.group(0).strip()] = _values(m.group(1), m.group(2))
    for m in _NUMWORD.finditer(text):
        if free(m):
            numbers[m.group(0)] = {float(_WORDS[m.group(1).lower()])}
    for w, n in _ORDINALS.items():  # "the third time" supports a "3"
        if re.search(rf"\b{w}\b", text, re.I):
            numbers.setdefault(w, {float(n)})
    years = {int(v) for vals in numbers.values() for v in vals if v == int(v) and 1000 <= v <= 2199}
    return _Facts(numbers, amounts, currencies, centuries, decades, years)


# ---- names ------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"[^\W\d_][\w'.-]*|[^\w\s]")
_SENTENCE_END = set(".!?:;\"“”‘'()[]*#-–—•")


def _names(text: str) -> list[tuple[list[str], bool]]:
    """Runs of capitalised words (joined by "of", "de"...), each with whether it starts a sentence."""
    runs: list[tuple[list[str], bool]] = []

    def close(run: list[str], initial: bool) -> None:
        while run and run[-1].lower() in _JOINERS:
            run = run[:-1]
        if run:
            runs.append((run, initial))

    for line in text.replace("’", "'").split("\n"):
        run: list[str] = []
        initial = run_initial = True  # whether the next word starts a sentence; whether the run did
        for tok in _TOKEN.findall(line):
            if tok[0].isalpha():
                word = tok.rstrip(".").removesuffix("'s")
                if word[0].isupper() and word.lower() not in _NOT_NAMES:
                    if not run:
                        run_initial = initial
                    run.append(word)
                elif run and word.lower() in _JOINERS:
                    run.append(word)
                else:
                    close(run, run_initial)
                    run = []
                initial = tok.endswith(".") and not _ABBREV.fullmatch(tok)
            else:
                close(run, run_initial)
                run = []
                initial = tok in _SENTENCE_END
        close(run, run_initial)
    return runs


_ABBREV = re.compile(r"(?:[A-Z]\.)+|(?:Mr|Mrs|Ms|Dr|St|Prof|Sr|Jr|Mt|Gen|Col|Sgt|Rev)\.")


def _initials(words: list[str], joiners: bool = False) -> str:
    return "".join(w[0] for w in words if joiners or w.lower() not in _JOINERS).upper()


def _words_in(words: list[str], source_words: set[str]) -> bool:
    return all(p.lower() in source_words for w in words for p in re.split(r"[-'.]", w) if p)


def _name_supported(run: list[str], initial: bool, source_words: set[str], source_initials: set[str]) -> bool:
    """Every word in the source (any case); or an acronym of a source name, or a name whose acronym the source
    uses; a sentence-initial first word ("Yesterday Johnson said") may be an ordinary word."""
    if _words_in(run, source_words):
        return True
    if initial and (len(run) == 1 or _words_in(run[1:], source_words)):
        return True
    if len(run) == 1 and sum(c.isupper() for c in run[0]) > 1 and run[0].upper() in source_initials:
        return True  # "UN" <- "United Nations", "BoE" <- "Bank of England"
    return len(run) > 1 and _initials(run).lower() in source_words  # "United Nations" <- "UN"


# ---- the check --------------------------------------------------------------------------------------------
def unsupported_content(source: str, generated: str, kinds: tuple[str, ...] = KINDS) -> list[Unsupported]:
    """Items of `generated` (of the given kinds) that `source` does not support, in order of appearance, once each.

    `source` is what the model was given (the document, the context); an empty list means nothing of these
    kinds was invented, not that the output is right."""
    src, gen = _facts(source), _facts(generated, skip_list_markers=True)
    out: list[Unsupported] = []
    src_values = set().union(*src.numbers.values(), *(v for _, v in src.amounts.values()))
    src_amounts: dict[str, set[float]] = {}
    for cur, vals in src.amounts.values():
        src_amounts.setdefault(cur, set()).update(vals)
    src_currencies = set(src.currencies.values())
    if "amount" in kinds:
        for text, (cur, vals) in gen.amounts.items():
            if not vals & src_amounts.get(cur, set()):
                out.append(Unsupported("amount", text))
        flagged = {cur for t, (cur, _) in gen.amounts.items() if Unsupported("amount", t) in out}
        for text, cur in gen.currencies.items():
            in_amount = any(text in t for t in gen.amounts)
            if cur not in src_currencies and cur not in flagged and not in_amount:
                out.append(Unsupported("amount", text))
    if "century" in kinds:
        src_centuries = set(src.centuries.values()) | {(y - 1) // 100 + 1 for y in src.years} | {
            y // 100 + 1 for y in src.years} | {d // 10 + 1 for d in src.decades.values()}
        out += [Unsupported("century", t) for t, n in gen.centuries.items() if n not in src_centuries]
    if "year" in kinds:
        src_decades = set(src.decades.values()) | {y // 10 for y in src.years}
        out += [Unsupported("year", t) for t, d in gen.decades.items() if d not in src_decades]
    if "number" in kinds or "year" in kinds:
        for text, vals in gen.numbers.items():
            if text.lower() in _NOT_CLAIMS or text.lower() in _ORDINALS or vals & src_values:
                continue
            is_year = any(v == int(v) and 1000 <= v <= 2199 for v in vals) and re.fullmatch(r"\d{4}", text)
            kind = "year" if is_year else "number"
            if kind in kinds:
                out.append(Unsupported(kind, text))
    if "name" in kinds:
        source_words = {w.lower() for w in re.findall(r"\w+", source)}
        source_initials = {_initials(r, j) for r, _ in _names(source) if len(r) > 1 for j in (False, True)}
        for run, initial in _names(generated):
            if not _name_supported(run, initial, source_words, source_initials):
                out.append(Unsupported("name", " ".join(run)))
    return list(dict.fromkeys(out))


def check(source: str, generated: str, task: str = "summarize") -> list[dict[str, str]]:
    """The items as JSON-ready dicts for a task's output: names are not checked for `translate`."""
    kinds = NUMBER_KINDS if task == "translate" else KINDS
    return [asdict(u) for u in unsupported_content(source, generated, kinds)]


def warning_line(items: list[dict[str, str]] | list[Unsupported]) -> str:
    """One stderr line, e.g. `warning: not in the source: amount "$40 million", century "18th century"`."""
    pairs = [(i.kind, i.text) if isinstance(i, Unsupported) else (i["kind"], i["text"]) for i in items]
    return "warning: not in the source (check before use): " + ", ".join(f'{k} "{t}"' for k, t in pairs)
