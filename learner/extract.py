"""Turn the user's own statements about themselves into third-person memory facts.

The learner runs this on the latest user message after each chat. It is conservative on
purpose: a sentence becomes a `Fact` only when it is a first-person declarative statement
about the user. Questions, hypotheticals, requests, small talk, other people's facts, quoted
or code text and memlane's own injected context are dropped. A missed fact is cheap (the
user will say it again); a wrong memory is injected into every later conversation.

A message that sets up a prompt or a persona for the assistant ("You are a helpful assistant",
"Act as ...") yields nothing. After a correction marker ("Correction:", "Sorry, I meant") a
trailing ", not X" is the old value and is dropped: "I'm vegetarian, not vegan" -> vegetarian.

Pipeline: hide text that is not the user speaking -> split into sentences -> reject by rule
-> rewrite "I"/"my" into "the user"/"the user's" with verb agreement -> classify the kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Fact", "extract_facts"]

MAX_SENTENCE_CHARS = 200
MIN_WORDS = 3  # subject included, contractions split: "I use Neovim", "I can't swim"


@dataclass(frozen=True, slots=True)
class Fact:
    content: str  # third-person, normalised: "The user is allergic to peanuts."
    kind: str  # "fact" | "preference" | "skill" | "event" | "negation"
    evidence: str  # the user's original sentence


# --- 1. Hide text that is not the user speaking -----------------------------------------
_HIDDEN = "\ue000"  # stands in for removed text; a sentence touching it is never stored
_QUOTE_CHARS = frozenset('"“”‘`')  # a stray quote left after hiding also drops the sentence

_BLOCK_BREAK = f"\n{_HIDDEN}\n"  # a hidden block also ends the sentence before it
_MEMORY_LINE_RE = re.compile(r"^[ \t]*(?:[-*+•][ \t]+)?the user\b.*$", re.IGNORECASE | re.MULTILINE)
_FENCE_RE = re.compile(r"(```|~~~).*?(?:\1|\Z)", re.DOTALL)  # fenced code, closed or not
_OPEN_TAG_RE = re.compile(r"<([A-Za-z][\w:.-]*)(?:\s[^<>]*)?>")  # <user_profile>, <memlane_...>
# Inline spans are replaced by the marker so their sentence is dropped. Quoted spans are
# capped in length so that many unclosed quotes cannot make the scan quadratic.
_INLINE_RES = (
    re.compile(r"`[^`\n]*`"),
    re.compile(r'"[^"]*"'),
    re.compile(r"“[^”]{0,400}”"),
    re.compile(r"‘[^‘]{0,400}?’(?!\w)"),
    re.compile(r"(?<!\w)'(?=\S)[^\n]{0,400}?(?<=\S)'(?!\w)"),  # 'single quoted', not I'm
    re.compile(r"</?[A-Za-z][\w:.-]*(?:\s[^<>]*)?>"),  # a stray tag
)

# A message that sets up a prompt or a persona for the assistant is not the user talking about
# themselves: "You are a helpful assistant. I am the system.", "Act as a terminal. I will ...".
_PROMPT_RE = re.compile(
    r"^\s*(?:#+\s*)?(?:system|instructions?|role|persona|assistant)\s*(?::|$)"
    r"|\b(?:you are|you're) (?:now |an? (?:helpful |expert |senior |ai |large )|the (?:system|assistant)|"
    r"chatgpt|claude|gpt|gemini|llama|dan)\b"
    r"|\bact as (?:an? |my |the )|\bfrom now on,? you\b|\bpretend (?:to be|you are)\b"
    r"|\bignore (?:all |any )?(?:previous|prior|above) (?:instructions|rules)\b",
    re.IGNORECASE | re.MULTILINE,
)

# --- 2. Sentences -----------------------------------------------------------------------
_ABBREVIATION_RE = re.compile(
    r"\b(?:e\.g|i\.e|vs|approx|mr|mrs|ms|dr|prof|st|jr|sr|a\.m|p\.m|u\.s|u\.k)\.", re.IGNORECASE
)
_PROTECTED_DOT = "\ue001"
_SENTENCE_BREAK_RE = re.compile(r"(?<=[.!?…])\s+|(?<=[a-z][.!?])(?=[A-Z])|\s*[\n;•]\s*")
_BULLET_RE = re.compile(r"^(?:[-*+]|\d+[.)])\s+")
_CORRECTION_MARKERS = (  # "Correction: my name is Anna", "Sorry, I meant I work at Stripe"
    r"correction|update|to be clear|to clarify|just to clarify|not quite|that's wrong|"
    r"that is wrong|wrong|sorry|i meant"
)
_LEAD_IN_RE = re.compile(  # discourse markers before the subject: "Also, I ..."
    r"^(?:(?:also|actually|well|oh|and|but|so|anyway|anyways|btw|by the way|fyi|fwiw|ps|"
    r"hi|hello|hey|ok|okay|yes|yeah|yep|no|nope|honestly|personally|for context|"
    r"for the record|fun fact|in fact|just so you know|"
    r"(?:please )?(?:remember|note|keep in mind)(?: that)?|"
    rf"{_CORRECTION_MARKERS})\b[\s,:!.—–-]*)+",
    re.IGNORECASE,
)
# After a correction marker, a trailing ", not X" names the old value: "I'm vegetarian, not vegan".
_CORRECTION_START_RE = re.compile(rf"^(?:actually|no|{_CORRECTION_MARKERS})\b", re.IGNORECASE)
_OLD_VALUE_RE = re.compile(r",\s*not\s+[^,;]+$", re.IGNORECASE)
_TRAILING_RE = re.compile(r"[\s.!…]+$")
# "My dog's a beagle": here 's is "is", not a possessive.
_IS_CONTRACTION_RE = re.compile(
    r"^(my\s+(?:[\w-]+\s+){0,3}?[\w-]+)'s(?=\s+(?:a|an|the|not|very|so|really|called|named|"
    r"from|in|at|always|never|only|still|also)\b)",
    re.IGNORECASE,
)

# --- 3. Rejections, matched against the lower-cased probe with contractions expanded ----
_CONTRACTIONS = (
    (re.compile(r"\bcan't\b|\bcannot\b"), "can not"),
    (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"\bain't\b"), "am not"),
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"\bi'm\b|\bim\b"), "i am"),
    (re.compile(r"\bi'd\b"), "i would"),  # 'd is "had" or "would": ambiguous, so modal
    (re.compile(r"'ve\b"), " have"),
    (re.compile(r"'ll\b"), " will"),
)
_CLAUSE_START = r"(?:^|[,;] |\b(?:and|but|so|because) )"
_QUESTION_RE = re.compile(
    r"\?|^(?:what|how|can|could|would|should|is|are|am|do|does|did|will|why|where|when|who|"
    r"whom|whose|which|was|were|have|has|shall|may|might)\b"
)
_HYPOTHETICAL_RE = re.compile(
    r"\b(?:if|unless|suppose|supposing|imagine|hypothetically|pretend|assuming|let's say|"
    r"would|might|could|should|shall|will|wish)\b|\bi (?:were|must|may)\b"
)
_FILLER_RE = re.compile(  # requests and talk about the conversation, not about the user
    _CLAUSE_START + r"i (?:(?:am|was|have|had|been|do|did|really|also|actually|still|"
    r"honestly|kind of|sort of) )*"
    r"(?:want|wanted|need|needed|think|thought|guess|mean|meant|hope|see|saw|understand|"
    r"understood|wonder|wondered|wondering|looking for|try|tried|trying|ask|asked|asking|just|"
    r"getting(?! married| divorced)|keep getting|running into|ran into|run into|"
    r"have to|had to|got to|gotta|"
    r"not sure|sure|sorry|confused|curious|glad|stuck|not know|not understand|not get|not see|"
    r"a question|another question|some questions|a quick question|an? (?:issue|problem)|"
    r"trouble|having (?:trouble|issues|problems|an? issue|a problem|difficulty)|"
    r"agree|disagree|believe|suppose|feel like|said|say|told|tell|forgot|noticed|realized|"
    r"realised|heard|going to|about to|appreciate|"
    r"can not (?:figure|get|seem|find|make|understand|remember|see|tell))\b"
)
_ADDRESSED_RE = re.compile(r"\b(?:you|your|yours|yourself|please|thanks|thank|thx)\b")
_DEICTIC_RE = re.compile(  # meaningless once the chat is gone: "I love this"
    r"\b(?:this|these|those|it|that|them|here|above|below|following|attached)\b"
)
_TROUBLESHOOTING_RE = re.compile(
    r"\b(?:errors?|exceptions?|warnings?|traceback|stack ?trace|segfault|bugs?|"
    r"crash(?:es|ed|ing)?)\b"
)
_UNFINISHED_RE = re.compile(
    r"(?:\b(?:is|are|was|were|am|be|been|the|a|an|to|of|and|or|with|in|at|on|for|from|by|"
    r"my|like|as|than|called|named)|[:,(])\s*$"
)
_TRANSIENT_RE = re.compile(  # a passing mood, not a fact: "I'm tired", "I'm back"
    r"^i am (?:so |very |really |a bit |kind of |pretty |just )?(?:tired|hungry|thirsty|bored|"
    r"busy|sleepy|stressed|excited|happy|sad|upset|annoyed|frustrated|exhausted|ok|okay|fine|"
    r"good|great|well|back|done|ready|late|lost|home|away|nervous|worried|anxious)(?: (?:now|today|"
    r"tonight|right now|again|lol))*(?: (?:about|for|with|that|to) .*)?$"
)
_REJECTIONS = (_QUESTION_RE, _HYPOTHETICAL_RE, _FILLER_RE, _ADDRESSED_RE, _DEICTIC_RE,
               _TROUBLESHOOTING_RE, _UNFINISHED_RE, _TRANSIENT_RE)

# --- 4. Subjects ------------------------------------------------------------------------
_ADVERBS = (
    r"really|also|usually|always|never|often|sometimes|mostly|generally|actually|still|"
    r"absolutely|definitely|totally|mainly|primarily|only|rarely|seldom|occasionally|"
    r"recently|currently|already|even|truly|personally|literally|basically|normally|"
    r"typically|regularly|frequently|now|just|finally|kind of|sort of|no longer"
)
_I_CLAUSE_RE = re.compile(
    r"(?P<lead>^|[,;]\s*|\b(?:and|but|so|because|since|when|while|as|or|than|where|after|"
    r"before|until|although|though)\s+)"
    rf"(?P<subject>I'm|I've|Im|I)\b(?P<adverbs>(?:\s+(?:{_ADVERBS})\b)*)"
    r"(?:\s+(?P<verb>[A-Za-z][\w'-]*))?",
    re.IGNORECASE,
)
_MY_SUBJECT_RE = re.compile(r"^my\s", re.IGNORECASE)
_OBJECT_PRONOUN_RE = re.compile(r"\b(?:[Mm]e|[Mm]y|[Mm]ine|[Mm]yself)\b")
_OBJECT_PRONOUNS = {"me": "the user", "my": "the user's", "mine": "the user's",
                    "myself": "themselves"}
_CONTRACTED_SUBJECTS = {"i'm": "the user is", "im": "the user is", "i've": "the user has"}

_NON_VERBS = frozenset(
    ["a", "an", "the", "and", "or", "but", "to", "in", "at", "on", "of", "for", "with", "from", "too", "as", "so", "not", "no", "myself", "me", "my", "mine", "i", "is", "are", "this", "that", "it"]
)
_POSSESSIVE_VERBS = frozenset(  # the verb that ends "my <noun phrase>"
    ["is", "are", "was", "were", "has", "have", "had", "does", "do", "did", "can", "will", "live", "lives", "lived", "work", "works", "worked", "like", "likes", "liked", "love", "loves", "loved", "hate", "hates", "hated", "enjoy", "enjoys", "prefer", "prefers", "go", "goes", "went", "include", "includes", "eat", "eats", "ate", "use", "uses", "start", "starts", "started", "begin", "begins", "began", "run", "runs", "ran", "play", "plays", "speak", "speaks", "know", "knows", "bark", "barks", "sleep", "sleeps", "cost", "costs", "weigh", "weighs", "come", "comes", "came", "called", "named"]
)
_PEOPLE = frozenset(
    ["friend", "bestie", "buddy", "pal", "colleague", "coworker", "co-worker", "boss", "manager", "employer", "mom", "mum", "mother", "dad", "father", "parent", "brother", "sister", "sibling", "twin", "wife", "husband", "partner", "spouse", "girlfriend", "boyfriend", "fiance", "fiancé", "fiancee", "fiancée", "ex", "son", "daughter", "kid", "child", "children", "baby", "aunt", "uncle", "cousin", "niece", "nephew", "grandma", "grandpa", "grandmother", "grandfather", "grandparent", "grandson", "granddaughter", "stepmom", "stepdad", "stepson", "stepdaughter", "in-law", "in-laws", "mother-in-law", "father-in-law", "neighbor", "neighbour", "roommate", "flatmate", "housemate", "classmate", "teammate", "team", "family", "relative", "teacher", "student", "mentor", "doctor", "therapist", "dentist", "lawyer", "coach", "client", "customer", "landlord", "nanny", "person", "people", "man", "men", "woman", "women", "guy", "girl", "boy", "folks"]
)
_RELATION_ATTRIBUTES = frozenset(["name", "names", "nickname", "birthday", "birthdays", "age", "anniversary"])
_CONVERSATION_NOUNS = frozenset(  # "my question is ...", "my code doesn't ..."
    ["question", "questions", "problem", "problems", "issue", "issues", "error", "bug", "code", "script", "function", "program", "query", "output", "input", "request", "prompt", "point", "answer", "reply", "message", "response", "test", "tests", "build", "file", "files", "repo", "config", "understanding", "guess", "concern", "mistake", "bad", "apologies", "thoughts", "take", "attempt", "solution", "doubt"]
)

# --- 5. Verb agreement, table-driven ----------------------------------------------------
_IRREGULAR_PRESENT = {"am": "is", "be": "is", "have": "has", "haven't": "hasn't",
                      "don't": "doesn't", "ain't": "isn't", "aren't": "isn't"}
_IRREGULAR_PAST = frozenset(
    ["was", "had", "did", "went", "got", "made", "began", "became", "grew", "took", "left", "bought", "met", "sold", "built", "ran", "wrote", "taught", "learnt", "spent", "felt", "found", "lost", "won", "gave", "came", "knew", "broke", "chose", "drove", "flew", "fell", "held", "kept", "led", "paid", "quit", "sat", "slept", "spoke", "stood", "swam", "threw", "wore", "drank", "ate", "sang", "rode", "brought", "caught", "fought", "dug", "hung", "shot", "stole", "struck", "born", "lent", "sent", "bent", "dealt", "burnt", "bit", "hid", "lit", "shook", "woke", "froze", "forgave", "tore", "swore", "wept", "fed", "fled", "bred"]
)
_MODALS = frozenset(["can", "cannot", "must"])
_SUFFIX_RULES = (  # first match wins; the last rule always matches
    (re.compile(r"([^aeiou])y$"), r"\1ies"),  # study -> studies
    (re.compile(r"(s|sh|ch|x|z|o)$"), r"\1es"),  # watch -> watches, go -> goes
    (re.compile(r"$"), "s"),  # live -> lives
)

# --- 6. Kinds: (kind, test on the main verb, pattern on the probe); first match wins ------
_PREFERENCE_VERBS = frozenset(
    ["like", "liked", "love", "loved", "hate", "hated", "enjoy", "enjoyed", "dislike", "disliked", "prefer", "preferred", "adore", "adored", "detest", "detested", "loathe"]
)
_SKILL_VERBS = frozenset(["know", "speak", "can", "code", "program"])
_NEGATION_RE = re.compile(r"\b(?:not|never|no|nobody|nothing|neither|nor)\b")
_PREFERENCE_RE = re.compile(r"\b(?:favou?rites?|fan of|fond of|passionate about|obsessed with)\b")
_SKILL_RE = re.compile(
    r"\b(?:fluent|proficient|good at|skilled|expert|experienced|native speaker)\b"
)
_EVENT_RE = re.compile(
    r"\b(?:born|moved|moving|started|starting|graduated|graduating|getting married|retiring|"
    r"joined|joining|quit|relocated|relocating)\b"
)



def _is_past(verb: str) -> bool:
    return verb in _IRREGULAR_PAST or (verb.endswith("ed") and not verb.endswith("eed"))


_KIND_RULES = (  # a statement matching none of these is a plain "fact"
    ("negation", frozenset().__contains__, _NEGATION_RE),  # wins: "I don't like X" negates
    ("preference", _PREFERENCE_VERBS.__contains__, _PREFERENCE_RE),
    ("skill", _SKILL_VERBS.__contains__, _SKILL_RE),
    ("event", _is_past, _EVENT_RE),
)


def extract_facts(text: str) -> list[Fact]:
    """Facts the user states about themselves in `text`, the latest user message only."""
    if _PROMPT_RE.search(text):  # a system prompt or a persona: its "I am ..." is role-play
        return []
    facts: dict[str, Fact] = {}
    for sentence in _sentences(_visible_text(text)):
        fact = _fact_from(sentence)
        if fact is not None:
            facts.setdefault(fact.content.casefold(), fact)
    return list(facts.values())


def _visible_text(text: str) -> str:
    """The message with code, tags, quotes and memlane's own memory lines hidden."""
    text = _hide_tagged_blocks(_FENCE_RE.sub(_BLOCK_BREAK, _MEMORY_LINE_RE.sub("", text)))
    for inline_re in _INLINE_RES:
        text = inline_re.sub(_HIDDEN, text)
    return text.replace("’", "'")


def _hide_tagged_blocks(text: str) -> str:
    """Hide each <tag>...</tag> block; an opening tag never closed hides the rest."""
    parts, position = [], 0
    while (opening := _OPEN_TAG_RE.search(text, position)) is not None:
        closing = re.compile(rf"</{re.escape(opening[1])}\s*>", re.IGNORECASE).search(text, opening.end())
        parts += [text[position : opening.start()], _BLOCK_BREAK]
        position = closing.end() if closing else len(text)
    return "".join(parts) + text[position:]


def _sentences(text: str) -> list[str]:
    protected = _ABBREVIATION_RE.sub(lambda m: m[0].replace(".", _PROTECTED_DOT), text)
    pieces = (_BULLET_RE.sub("", piece.strip()) for piece in _SENTENCE_BREAK_RE.split(protected))
    return [piece.replace(_PROTECTED_DOT, ".") for piece in pieces if piece]


def _fact_from(sentence: str) -> Fact | None:
    if _HIDDEN in sentence or _QUOTE_CHARS & set(sentence) or len(sentence) > MAX_SENTENCE_CHARS:
        return None
    statement = _statement(sentence)
    probe = _probe(statement)
    if len(re.findall(r"\w+", probe)) < MIN_WORDS or any(r.search(probe) for r in _REJECTIONS):
        return None
    if _MY_SUBJECT_RE.match(statement):
        verb = "" if _is_own_possession(probe) else None
    else:
        verb = _main_verb(statement)
    if verb is None:
        return None
    return Fact(_finish(_third_person(statement)), _kind(probe, verb), sentence)


def _statement(sentence: str) -> str:
    """The sentence without lead-in words, final punctuation and contracted "'s" (is)."""
    statement = _TRAILING_RE.sub("", _LEAD_IN_RE.sub("", sentence))
    if _CORRECTION_START_RE.match(sentence):
        statement = _OLD_VALUE_RE.sub("", statement)
    return _IS_CONTRACTION_RE.sub(r"\1 is", statement)


def _probe(statement: str) -> str:
    probe = statement.lower()
    for contraction_re, expansion in _CONTRACTIONS:
        probe = contraction_re.sub(expansion, probe)
    return " ".join(probe.split())


def _main_verb(statement: str) -> str | None:
    """The verb after a leading "I" (lower-cased), or None if this is no I-statement."""
    match = _I_CLAUSE_RE.match(statement)
    if match is None or match["lead"]:
        return None
    subject = match["subject"].lower()
    if subject in _CONTRACTED_SUBJECTS:
        return "am" if subject != "i've" else "have"
    verb = (match["verb"] or "").lower()
    return None if not verb or verb in _NON_VERBS else verb


def _is_own_possession(probe: str) -> bool:
    """True for "my <thing> ...", False for "my friend ..." or "my code ..."."""
    words = probe.split()[1:7]
    verb_at = next((i for i, word in enumerate(words) if i and _is_possessive_verb(word)), 0)
    phrase = [word.strip(",") for word in words[:verb_at]]
    owned_from = 1 + max((i for i, word in enumerate(phrase) if word.endswith(("'s", "s'"))),
                         default=-1)
    owners, owned = phrase[:owned_from], phrase[owned_from:]
    if not owned or any(word in _CONVERSATION_NOUNS for word in owned):
        return False
    if any(_is_person(word) for word in owners):
        return all(word in _RELATION_ATTRIBUTES for word in owned)  # "my wife's name"
    return not any(_is_person(word) for word in owned)


def _is_possessive_verb(word: str) -> bool:
    """A closed list, or a third-person "-s" form that is no plural person or topic."""
    if word in _POSSESSIVE_VERBS:
        return True
    plain_s = word.endswith("s") and not word.endswith(("'s", "ss", "us", "is"))
    return plain_s and not _is_person(word) and word not in _CONVERSATION_NOUNS


def _is_person(word: str) -> bool:
    word = word.removesuffix("'s").removesuffix("'")
    return word in _PEOPLE or (word.endswith("s") and word[:-1] in _PEOPLE)


def _third_person(statement: str) -> str:
    rewritten = _I_CLAUSE_RE.sub(_rewrite_clause, statement)
    return _OBJECT_PRONOUN_RE.sub(lambda m: _OBJECT_PRONOUNS[m[0].lower()], rewritten)


def _rewrite_clause(match: re.Match[str]) -> str:
    adverbs, verb = match["adverbs"], match["verb"]
    head = _CONTRACTED_SUBJECTS.get(match["subject"].lower())
    if head is None:
        head, verb = "the user", verb and _conjugate(verb)
    return match["lead"] + head + adverbs + (f" {verb}" if verb else "")


def _conjugate(verb: str) -> str:
    """First-person verb -> third person singular: have -> has, watch -> watches."""
    low = verb.lower()
    if low in _IRREGULAR_PRESENT:
        return _IRREGULAR_PRESENT[low]
    if low in _NON_VERBS or low in _MODALS or "'" in low or _is_past(low):
        return verb
    suffix_re, replacement = next(rule for rule in _SUFFIX_RULES if rule[0].search(low))
    return suffix_re.sub(replacement, low, count=1)


def _kind(probe: str, verb: str) -> str:
    matches = (kind for kind, is_kind_verb, pattern in _KIND_RULES
               if is_kind_verb(verb) or pattern.search(probe))
    return next(matches, "fact")


def _finish(content: str) -> str:
    content = " ".join(content.split()).rstrip(" ,;:.!…")
    return content[:1].upper() + content[1:] + "."
