"""Word categories of prompt tokens (the paper's Fig. 8b / Sec. 7.5: object, position, colour,
others). A word list per category, configurable (``--words FILE.json``: {"Object": [...],
"Color": [...], "Relation": [...]}); a word in no list is "Other"; the context's marker tokens
(<|im_start|>, <|im_end|>, ...) are "Special".

Tokens are grouped into words as the tokenizer spells them: a token whose text starts with a
space, follows a token without letters or is next to a marker starts a new word; every token of a
word gets the word's category.
"""
from __future__ import annotations

import re

from sgt_jax import fileio

OBJECT, COLOR, RELATION, OTHER, SPECIAL = "Object", "Color", "Relation", "Other", "Special"
CATEGORIES = (OBJECT, COLOR, RELATION, OTHER, SPECIAL)

DEFAULT_WORDS = {
    # GenEval's COCO object names (single words and heads of multi-word names) + the synthetic shapes
    OBJECT: """person bicycle car motorcycle airplane bus train truck boat light hydrant sign meter bench bird
        cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee skis
        snowboard ball kite bat glove skateboard surfboard racket bottle glass cup fork knife spoon bowl banana
        apple sandwich broccoli carrot pizza donut cake chair couch plant bed table toilet tv laptop
        mouse remote keyboard phone microwave oven toaster sink refrigerator book clock vase scissors bear
        drier toothbrush baseball tennis square rectangle circle ellipse triangle shape shapes""".split(),
    COLOR: """red green blue yellow orange purple pink cyan white black gray grey brown""".split(),
    RELATION: """left right above below under over behind front next beside near top bottom between on
        in""".split(),
}


def load_words(path: str | None) -> dict[str, list[str]]:
    """The word lists: DEFAULT_WORDS, or a JSON file {category: [words]} (any category names)."""
    if not path:
        return {k: list(v) for k, v in DEFAULT_WORDS.items()}
    words = fileio.read_json(path)
    if not isinstance(words, dict) or not all(isinstance(v, list) for v in words.values()):
        raise ValueError(f"{path}: a JSON object {{category: [words, ...]}} expected")
    return {str(k): [str(w).lower() for w in v] for k, v in words.items()}


def _norm(word: str) -> str:
    return re.sub(r"[^a-z]", "", word.lower())


def token_words(pieces: list[str], special: list[bool]) -> list[int]:
    """Word index of each token from the tokens' decoded texts; a marker token is a word alone."""
    out, w = [], -1
    for i, p in enumerate(pieces):
        if i == 0 or p[:1].isspace() or special[i] or special[i - 1] or not _norm(pieces[i - 1]):
            w += 1
        out.append(w)
    return out


def categorize(pieces: list[str], special: list[bool], words: dict[str, list[str]]) -> list[str]:
    """Category of each token (decoded texts ``pieces``; ``special`` marks marker tokens)."""
    lookup = {}
    for cat, ws in words.items():
        for w in ws:
            lookup.setdefault(_norm(w), cat)
    idx = token_words(pieces, special)
    text = {}
    for i, p in zip(idx, pieces):
        text[i] = text.get(i, "") + p
    return [SPECIAL if s else lookup.get(_norm(text[i]), OTHER) for i, s in zip(idx, special)]
