"""Writes synthetic_train.conll and synthetic_test.conll: sentences from a small template grammar,
tagged in the CoNLL-2003 layout (word, Penn Treebank POS, CoNLL-2000 BIO chunk, BIO NER).

Every sentence and tag comes from the rules below (no corpus is read). Some words need their
context to be tagged, on the left (``walks``: NNS after a determiner, VBZ after a subject) or
only on the right (``her`` PRP$ before a noun, PRP before a full stop; ``that`` DT before a
noun, IN before a clause; ``to`` B-VP before a verb, B-PP before a noun phrase; ``New`` JJ
before a common noun, B-LOC in ``New York``; ``Washington`` B-PER before a verb, B-LOC after a
preposition, B-ORG in ``the Washington Post``).

Run: python tests/data/probe/make_synthetic.py (fixed seed: the same files every time).
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 20261203
TRAIN_SENTENCES = 500
TEST_SENTENCES = 150

Token = tuple[str, str, str, str]  # word, POS, chunk, NER

DETERMINERS = ["the", "a", "every", "this", "that", "some"]
POSSESSIVES = ["his", "their", "our", "her"]
PRONOUNS = ["she", "he", "they", "we", "it"]
ADJECTIVES = ["old", "new", "small", "quiet", "long", "bright", "early", "local", "strange"]
# (singular, plural, present 3rd person, base): the plural and the verb forms coincide
NOUN_VERBS = [
    ("walk", "walks", "walks", "walk"),
    ("plan", "plans", "plans", "plan"),
    ("record", "records", "records", "record"),
    ("study", "studies", "studies", "study"),
    ("run", "runs", "runs", "run"),
    ("visit", "visits", "visits", "visit"),
    ("report", "reports", "reports", "report"),
]
NOUNS = [
    ("dog", "dogs"),
    ("book", "books"),
    ("market", "markets"),
    ("price", "prices"),
    ("letter", "letters"),
    ("garden", "gardens"),
    ("question", "questions"),
    ("film", "films"),
    ("team", "teams"),
]
VERBS = [  # (past, present 3rd person, base)
    ("saw", "sees", "see"),
    ("read", "reads", "read"),
    ("wrote", "writes", "write"),
    ("found", "finds", "find"),
    ("liked", "likes", "like"),
    ("signed", "signs", "sign"),
    ("bought", "buys", "buy"),
    ("praised", "praises", "praise"),
]
CONTROL_VERBS = [("wanted", "VBD"), ("hoped", "VBD"), ("tried", "VBD"), ("wants", "VBZ")]
SAY_VERBS = [("said", "VBD"), ("thinks", "VBZ"), ("knew", "VBD"), ("says", "VBZ")]
MODALS = ["will", "can", "should", "might"]
ADVERBS = ["quickly", "often", "quietly", "rarely", "today"]
PREPOSITIONS = ["in", "near", "from", "after", "about", "with"]
PERSONS = [["Anna"], ["Peter"], ["Maria", "Lopez"], ["John", "Smith"], ["Jordan"], ["Washington"]]
PLACES = [["Paris"], ["Berlin"], ["London"], ["New", "York"], ["Jordan"], ["Washington"]]
ORGANIZATIONS = [
    ["Acme", "Corp."],
    ["Globex"],
    ["Reuters"],
    ["the", "United", "Nations"],
    ["the", "Washington", "Post"],
]
NATIONALITIES = ["German", "French", "English", "Italian"]


def name_tokens(words: list[str], kind: str, chunk_open: bool) -> list[Token]:
    """A name as NNP words (a leading ``the`` as DT, outside the entity) in one NP chunk."""
    tokens: list[Token] = []
    entity_started = False
    for word in words:
        chunk = "I-NP" if chunk_open or tokens else "B-NP"
        if word == "the":
            tokens.append((word, "DT", chunk, "O"))
            continue
        pos = "NNPS" if word == "Nations" else "NNP"
        tokens.append((word, pos, chunk, ("I-" if entity_started else "B-") + kind))
        entity_started = True
    return tokens


def noun_phrase(rng: random.Random, role: str) -> list[Token]:
    """A noun phrase; ``role`` is subject, object or place (after a preposition)."""
    choice = rng.random()
    if role == "place" and choice < 0.55:
        return name_tokens(rng.choice(PLACES), "LOC", False)
    if role == "subject" and choice < 0.2:
        word = rng.choice(PRONOUNS)
        return [(word, "PRP", "B-NP", "O")]
    if choice < 0.35:
        kind, names = rng.choice([("PER", PERSONS), ("ORG", ORGANIZATIONS)])
        return name_tokens(rng.choice(names), kind, False)
    tokens: list[Token] = []
    plural = rng.random() < 0.3
    if rng.random() < 0.25:
        tokens.append((rng.choice(POSSESSIVES), "PRP$", "B-NP", "O"))
    elif not plural or rng.random() < 0.5:
        determiner = rng.choice(DETERMINERS if not plural else ["the", "some"])
        tokens.append((determiner, "DT", "B-NP", "O"))
    modifier = rng.random()
    if modifier < 0.3:
        tokens.append((rng.choice(ADJECTIVES), "JJ", "I-NP" if tokens else "B-NP", "O"))
    elif modifier < 0.4:
        tokens.append((rng.choice(NATIONALITIES), "JJ", "I-NP" if tokens else "B-NP", "B-MISC"))
    if rng.random() < 0.5:
        singular, plural_form, _, _ = rng.choice(NOUN_VERBS)
    else:
        singular, plural_form = rng.choice(NOUNS)
    noun = (plural_form, "NNS") if plural else (singular, "NN")
    tokens.append((noun[0], noun[1], "I-NP" if tokens else "B-NP", "O"))
    return tokens


def verb_group(rng: random.Random, subject: list[Token]) -> list[Token]:
    """The verbs of a clause, agreeing with a singular third-person subject or not."""
    third_singular = subject[-1][1] in ("NN", "NNP", "NNPS") or subject[-1][0] in (
        "she",
        "he",
        "it",
    )
    choice = rng.random()
    if choice < 0.25:
        return [
            (rng.choice(MODALS), "MD", "B-VP", "O"),
            (rng.choice(VERBS + NOUN_VERBS)[-1], "VB", "I-VP", "O"),
        ]
    if choice < 0.4:
        verb, tag = rng.choice(CONTROL_VERBS)
        if tag == "VBZ" and not third_singular:
            verb, tag = "want", "VBP"
        base = rng.choice(VERBS + NOUN_VERBS)[-1]
        return [(verb, tag, "B-VP", "O"), ("to", "TO", "I-VP", "O"), (base, "VB", "I-VP", "O")]
    if choice < 0.55:  # "she walks", "they walk", "he records"
        _, _, third, base = rng.choice(NOUN_VERBS)
        return [(third, "VBZ", "B-VP", "O") if third_singular else (base, "VBP", "B-VP", "O")]
    past, third, base = rng.choice(VERBS)
    if rng.random() < 0.6:
        return [(past, "VBD", "B-VP", "O")]
    return [(third, "VBZ", "B-VP", "O") if third_singular else (base, "VBP", "B-VP", "O")]


def clause(rng: random.Random, depth: int = 0) -> list[Token]:
    subject = noun_phrase(rng, "subject")
    tokens = subject + verb_group(rng, subject)
    ending = rng.random()
    if ending < 0.15 and depth == 0:
        verb, tag = rng.choice(SAY_VERBS)
        tokens = subject + [(verb, tag, "B-VP", "O"), ("that", "IN", "B-SBAR", "O")]
        return tokens + clause(rng, depth + 1)
    if ending < 0.3:
        tokens.append(("her", "PRP", "B-NP", "O"))  # the object pronoun, before the end
        return tokens
    if ending < 0.4:
        tokens += [("to", "TO", "B-PP", "O")] + noun_phrase(rng, "place")
        return tokens
    tokens += noun_phrase(rng, "object")
    if rng.random() < 0.4:
        tokens += [(rng.choice(PREPOSITIONS), "IN", "B-PP", "O")] + noun_phrase(rng, "place")
    if rng.random() < 0.2:
        tokens.append((rng.choice(ADVERBS), "RB", "B-ADVP", "O"))
    return tokens


def sentence(rng: random.Random) -> list[Token]:
    tokens = clause(rng)
    if rng.random() < 0.2:
        tokens += [(",", ",", "O", "O"), ("and", "CC", "O", "O")] + clause(rng, 1)
    tokens.append((".", ".", "O", "O"))
    word, pos, chunk, ner = tokens[0]
    return [(word[0].upper() + word[1:], pos, chunk, ner)] + tokens[1:]


def write(path: Path, sentences: list[list[Token]]) -> None:
    blocks = ["\n".join(" ".join(token) for token in tokens) for tokens in sentences]
    path.write_text("-DOCSTART- -X- -X- O\n\n" + "\n\n".join(blocks) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    seen: set[str] = set()
    train: list[list[Token]] = []
    test: list[list[Token]] = []
    while len(train) < TRAIN_SENTENCES or len(test) < TEST_SENTENCES:
        tokens = sentence(rng)
        text = " ".join(token[0] for token in tokens)
        if text in seen:
            continue
        seen.add(text)
        (train if len(train) < TRAIN_SENTENCES else test).append(tokens)
    write(HERE / "synthetic_train.conll", train)
    write(HERE / "synthetic_test.conll", test)


if __name__ == "__main__":
    main()
