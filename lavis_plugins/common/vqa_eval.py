"""VQA answer normalisation and accuracy (VQAv2's official metric), without LAVIS's file-based API.

The official metric (Antol et al.; ``vqaEval.py`` of the VQA API, which LAVIS ships as
``lavis/common/vqa_tools/vqa_eval.py``): a prediction is compared with the 10 human answers; for
each human answer left out in turn, the score is ``min(1, #matches among the other 9 / 3)``, and the
10 scores are averaged. Answers are normalised first: punctuation removed or turned into spaces,
lower case, number words to digits, articles dropped, contractions given their apostrophe.

Two behaviours follow LAVIS's evaluator (the one BLIP-2's published numbers come from), which
differs from the VQA API in how much it normalises, and tests check equality with it:
- the prediction is always normalised (punctuation, then digits/articles/contractions);
- human answers are only punctuation-normalised, and only when they disagree (VQAv2's annotation
  files already hold normalised answers).

Single-answer datasets (GQA, video QA) use exact match after normalising the prediction and the
answer the same way (``exact_match``).
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Sequence

CONTRACTIONS: Dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    # sic: the official table maps "somebody'd" the wrong way round; kept for equal scores
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: Dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# apostrophes, colons and full stops are handled separately (contractions, times, decimals)
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
# a full stop not followed by a digit ("3.5" keeps its point). The official pattern is written
# "(?!<=\d)(\.)(?!\d)", whose first group is a look-ahead that never fails: this is what it does.
_PERIOD = re.compile(r"\.(?!\d)")
# the official call passes re.UNICODE (= 32) as sub()'s *count*, so at most 32 stops go
_PERIOD_MAX_REMOVED = 32
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def normalize_punctuation(text: str) -> str:
    """Drop a punctuation mark when it touches a space (or the text has a "1,000"-style number),
    else turn it into a space; then drop full stops that are not decimal points."""
    has_number_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        # decided on the original text, as the official code does
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REMOVED)


def normalize_words(text: str) -> str:
    """Lower case, number words to digits, articles dropped, contractions fixed."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The full normalisation applied to a predicted answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(normalize_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction in [0, 1] (see the module docstring).

    Args:
        prediction: the model's answer, raw.
        human_answers: the annotators' answers (10 in VQAv2; any number >= 1 works).
    """
    if len(human_answers) == 0:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    gts = list(human_answers)
    if len(set(gts)) > 1:
        gts = [normalize_punctuation(a) for a in gts]
    scores = []
    for i in range(len(gts)):
        # leave one annotator out (the official code compares answer dicts, which differ by
        # answer_id, so exactly one is removed even when others gave the same answer)
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / len(scores)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def mean_percent(scores: Iterable[float], digits: int = 2) -> float:
    """Mean of per-question scores as a percentage, rounded like the official script."""
    scores = list(scores)
    if not scores:
        raise ValueError("no scores to average")
    return round(100.0 * sum(scores) / len(scores), digits)


def accuracy_by(scores: Sequence[float], groups: Sequence[str], digits: int = 2
                ) -> Dict[str, float]:
    """Per-group percentage (e.g. by VQAv2 answer type: "yes/no", "number", "other")."""
    by: Dict[str, List[float]] = {}
    for s, g in zip(scores, groups):
        by.setdefault(str(g), []).append(s)
    return {g: mean_percent(v, digits) for g, v in sorted(by.items())}
