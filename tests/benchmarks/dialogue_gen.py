"""A seeded generator of synthetic multi-session personal chats with evidence labels.

No public multi-session dialogue dataset with evidence labels (LoCoMo, LongMemEval, MSC) can be
had offline here, so the retrieval-quality benchmark (`bench_retrieval_quality`) runs on this.

What a generated user looks like:
- `sessions` chat sessions, 1-6 days apart, turns one minute apart. Only user turns are
  generated: memlane extracts memories from user turns alone.
- Personal facts in *slots*. Single-valued slots (city, employer, job, car, pet names, partner's
  name, favourites, age, ...) are stated once, sometimes restated later in another phrasing
  (corroboration), and sometimes corrected in a later session ("I moved to Berlin." after
  "I live in Paris."), at most twice. Multi-valued slots (allergies, languages, instruments) get
  two or three values stated in different sessions. Every phrasing was checked against
  `learner.extract.extract_facts`: it extracts a memory from it, and a correction is one that
  `memory.relations.parse_relation` reads as the same relation with another value, so memlane
  supersedes the old memory (tests/memory/test_dialogue_gen.py checks both).
- Distractors: many first-person statements the extractor also stores (meals, outings, books,
  purchases, plans), part of them *hard negatives* that reuse a slot's vocabulary ("I visited
  Berlin for a conference.", "I had lunch with a recruiter from Siemens."), plus chit-chat and
  questions to the assistant that store nothing. About 20-35 turns a session, several topics.
- Questions about a slot, asked in a session after the one where it was last stated, phrased
  with and without the words of the fact ("Where do I live these days?", "What's the weather
  usually like where I'm based in winter?").

Evidence: a question's evidence turns are the turns stating the value current when it is asked:
after a correction, the correction turn (and later restatements of the new value), never the
turns stating the old value; for a multi-valued slot, every turn stating one of its values.
Question kinds: `stable` (stated once), `restated` (current value stated two or more times),
`corrected` (current value replaced an older one), `multi` (multi-valued slot).

    users = generate(seed=7, users=40, sessions=12)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

__all__ = ["QUESTION_KINDS", "SLOTS", "Question", "Session", "Slot", "Turn", "User", "generate"]

QUESTION_KINDS = ("stable", "restated", "corrected", "multi")
START = datetime(2025, 1, 6, 9, 0, 0)

CITIES = ["Lisbon", "Berlin", "Paris", "Madrid", "Vienna", "Prague", "Oslo", "Dublin", "Toronto",
          "Seattle", "Denver", "Austin", "Chicago", "Boston", "Melbourne", "Auckland", "Osaka",
          "Seoul", "Warsaw", "Budapest", "Zurich", "Munich", "Hamburg", "Lyon", "Porto",
          "Edinburgh", "Manchester", "Copenhagen", "Helsinki", "Stockholm", "Montreal",
          "Vancouver", "Barcelona", "Valencia", "Milan", "Naples", "Athens", "Krakow"]
COMPANIES = ["Siemens", "Spotify", "Deloitte", "Airbus", "Unilever", "Shopify", "Atlassian",
             "Zalando", "Philips", "Ericsson", "Nokia", "Bosch", "Adidas", "Heineken", "Roche",
             "Novartis", "Accenture", "Canva", "Stripe", "Klarna", "Booking.com", "Mozilla",
             "Ubisoft", "Lego", "Ikea", "Maersk", "Vodafone", "Danone", "Michelin", "Nestle"]
JOBS = ["nurse", "software engineer", "data analyst", "graphic designer", "civil engineer",
        "pharmacist", "architect", "accountant", "physiotherapist", "journalist", "chef",
        "lawyer", "veterinarian", "electrician", "product manager", "translator",
        "marine biologist", "photographer", "librarian", "firefighter", "pilot", "dentist"]
PET_NAMES = ["Biscuit", "Luna", "Pepper", "Mochi", "Olive", "Ziggy", "Nala", "Rocket", "Maple",
             "Tofu", "Bruno", "Cleo", "Waffles", "Juniper", "Pixel", "Socks", "Hazel", "Bandit"]
PEOPLE = ["Sam", "Alex", "Jordan", "Priya", "Mateo", "Lena", "Tomas", "Aisha", "Noah", "Mira",
          "Kenji", "Sofia", "Elias", "Hannah", "Omar", "Chloe", "Ravi", "Ingrid"]
CARS = ["Toyota Corolla", "Volvo XC40", "Tesla Model 3", "Honda Civic", "Ford Focus",
        "Skoda Octavia", "Mazda MX-5", "Renault Clio", "Kia Niro", "Subaru Outback",
        "Fiat Panda", "Volkswagen Golf", "Nissan Leaf", "Hyundai Ioniq"]
FOODS = ["ramen", "sushi", "lasagna", "tacos", "pad thai", "falafel", "paella", "pho",
         "risotto", "dumplings", "goulash", "moussaka", "biryani", "ceviche", "pierogi"]
BANDS = ["Radiohead", "Coldplay", "Daft Punk", "Arctic Monkeys", "Fleetwood Mac", "Metallica",
         "Tame Impala", "Florence and the Machine", "The Beatles", "Massive Attack", "ABBA"]
SPORTS = ["tennis", "basketball", "volleyball", "rugby", "cricket", "badminton", "handball",
          "ice hockey", "table tennis", "cycling", "climbing", "rowing"]
BIRTHDAYS = [f"{month} {day}" for month in ("March", "June", "September", "November", "January")
             for day in (3, 11, 17, 24, 29)]
ALLERGENS = ["peanuts", "shellfish", "kiwi", "penicillin", "cat hair", "pollen", "gluten",
             "sesame", "bee stings", "latex", "strawberries", "mustard"]
LANGUAGES = ["Portuguese", "German", "Japanese", "Spanish", "Italian", "Korean", "Polish",
             "Dutch", "Swedish", "Arabic", "Hindi", "Greek", "Turkish", "Mandarin"]
INSTRUMENTS = ["cello", "violin", "piano", "guitar", "drums", "saxophone", "flute",
               "trumpet", "ukulele", "clarinet", "harp", "bass guitar"]


@dataclass(frozen=True, slots=True)
class Slot:
    """One kind of personal fact: how it is stated, corrected, restated and asked about."""

    name: str
    values: tuple[str, ...]
    state: tuple[str, ...]  # "{v}" is the value
    correct: tuple[str, ...] = ()  # statements of a new value; empty: never corrected
    questions: tuple[str, ...] = ()
    hard_negatives: tuple[str, ...] = ()  # "{x}" is another value of the slot
    multi: bool = False  # several values hold at once (allergies), never corrected


def _slot(name: str, values: list[str], state: list[str], correct: list[str], questions: list[str],
          negatives: list[str], multi: bool = False) -> Slot:
    return Slot(name, tuple(values), tuple(state), tuple(correct), tuple(questions),
                tuple(negatives), multi)


SLOTS: tuple[Slot, ...] = (
    _slot("residence", CITIES,
          ["I live in {v}.", "I'm based in {v}.", "Just so you know, I live in {v}."],
          ["I moved to {v} last month.", "I have moved to {v}.", "I relocated to {v} recently.",
           "Actually, I live in {v} now."],
          ["Where do I live these days?", "Which city am I living in right now?",
           "What's the weather usually like where I'm based in winter?",
           "Can you recommend some neighbourhoods to explore in my home city?",
           "Are there good day trips from the place I call home?"],
          ["I visited {x} for a conference last year.", "I'm planning a trip to {x}.",
           "I spent a weekend in {x} in 2019.", "I lived in {x} for two years as a student.",
           "I used to live in {x}.", "I helped my sister move to {x}."]),
    _slot("employer", COMPANIES,
          ["I work at {v}.", "I work for {v}.", "I'm working at {v}."],
          ["I joined {v} last week.", "I started working at {v}.", "I work at {v} now."],
          ["Which company do I work for?", "Who is my current employer?",
           "Help me draft a note to HR at my company about parental leave.",
           "Where am I employed at the moment?"],
          ["I had lunch with a recruiter from {x}.", "I applied for a job at {x} in 2021.",
           "I read an article about {x} today.", "I used to work at {x}.",
           "I did an internship at {x} in 2015.", "I interviewed at {x} last week."]),
    _slot("occupation", JOBS,
          ["I work as a {v}.", "I work as an {v}."],
          ["I work as a {v} now.", "I work as an {v} now."],
          ["What do I do for a living?", "What is my profession?",
           "Suggest some professional development courses that fit my line of work."],
          ["I met a {x} at a party yesterday.", "I watched a documentary about a {x}.",
           "I worked as a {x} in 2012.", "I trained as a {x} before university."]),
    _slot("dog_name", PET_NAMES,
          ["My dog is called {v}.", "My dog's name is {v}.", "My dog is named {v}."], [],
          ["What is my dog called?", "What's the name of my dog?",
           "Can you suggest a birthday treat for my puppy?"],
          ["I walked my neighbour's dog in the park.", "I watched a video about a dog called {x}.",
           "My old dog was called {x}."]),
    _slot("cat_name", PET_NAMES,
          ["My cat is called {v}.", "My cat's name is {v}.", "My cat is named {v}."], [],
          ["What is my cat's name?", "Which name did I give my kitten?"],
          ["I fed my sister's cat on Sunday.", "I read a story about a cat named {x}.",
           "My first cat was named {x}."]),
    _slot("vehicle", CARS,
          ["I drive a {v}."], ["I drive a {v} now."],
          ["What car do I drive?", "How often should I service my car?",
           "What kind of vehicle do I own?"],
          ["I rented a {x} on holiday.", "I read a review of the {x}.",
           "I used to drive a {x}."]),
    _slot("partner_name", PEOPLE,
          ["My partner's name is {v}."], ["My partner's name is {v} now."],
          ["What is my partner's name?", "Help me write an anniversary card for my partner."],
          ["I had coffee with {x} from work.", "I went cycling with {x} on Sunday.",
           "I dated someone called {x} in 2016."]),
    _slot("favorite_food", FOODS,
          ["My favorite food is {v}.", "My favourite food is {v}."],
          ["My favorite food is {v} now."],
          ["What's my favourite dish?", "Plan a dinner menu around the food I like most."],
          ["I had {x} for lunch today.", "I booked a table at a {x} place.",
           "My favourite food as a kid was {x}."]),
    _slot("favorite_band", BANDS,
          ["My favourite band is {v}.", "My favorite band is {v}."],
          ["My favorite band is {v} now."],
          ["Which band do I like best?", "Recommend some music similar to my favourite band."],
          ["I listened to a podcast about {x}.", "I bought a poster of {x}.",
           "I used to be a big fan of {x}."]),
    _slot("favorite_sport", SPORTS,
          ["My favorite sport is {v}.", "My favourite sport is {v}."],
          ["My favourite sport is {v} now."],
          ["What sport do I enjoy most?", "Find me a club for my favourite sport."],
          ["I watched a {x} match on TV.", "I went to a {x} game with my cousin.",
           "I played {x} at school."]),
    _slot("age", [str(n) for n in range(24, 61)],
          ["I'm {v} years old."], ["I'm {v} now."],
          ["How old am I?", "What age am I right now?"],
          ["I went to a {x}th birthday party on Saturday.", "I was {x} when I moved abroad."]),
    _slot("birthday", BIRTHDAYS,
          ["My birthday is on {v}."], [],
          ["When is my birthday?", "When should my friends plan my birthday party?"],
          ["I went to a concert on {x}.", "I celebrated my nephew's birthday on {x}."]),
    _slot("hometown", CITIES,
          ["My hometown is {v}.", "I grew up in {v}."], [],
          ["Where did I grow up?", "What is the traditional food of my hometown?"],
          ["I watched a documentary about {x}.", "I grew up near {x}."]),
    _slot("allergies", ALLERGENS,
          ["I'm allergic to {v}.", "I am allergic to {v}.", "I'm also allergic to {v}."], [],
          ["What am I allergic to?", "Which ingredients should I avoid when cooking for myself?",
           "What should I tell a doctor about my allergies?"],
          ["I read an article about {x}.", "I'm not allergic to {x}."], multi=True),
    _slot("languages", LANGUAGES,
          ["I speak {v}.", "I also speak {v}.", "I speak fluent {v}."], [],
          ["Which languages do I speak?",
           "In which countries could I chat with locals in their own language?"],
          ["I watched a {x} film last night.", "I'm learning {x}.",
           "I took a {x} class in 2017."], multi=True),
    _slot("instruments", INSTRUMENTS,
          ["I play the {v}.", "I also play the {v}."], [],
          ["What instruments do I play?", "Suggest some sheet music for the instruments I play."],
          ["I went to a {x} concert on Friday.", "I used to play the {x}."], multi=True),
)

_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_FILL = {
    "activity": ["hiking", "cycling", "swimming", "bouldering", "kayaking", "jogging",
                 "skating", "fishing", "birdwatching", "sailing"],
    "companion": ["my brother", "my cousin", "some friends", "my colleagues", "my niece",
                  "my neighbours", "my flatmate", "my parents"],
    "day": _DAYS,
    "food": FOODS + ["soup", "a burrito", "pancakes", "a salad", "curry", "noodles"],
    "meal": ["lunch", "dinner", "breakfast"],
    "topic": ["volcanoes", "octopuses", "the Roman empire", "black holes", "bees", "glaciers",
              "medieval castles", "jazz history", "coral reefs", "ancient Egypt", "typography",
              "urban gardening", "the deep sea", "chess openings", "the moon landing"],
    "item": ["kettle", "laptop", "backpack", "desk lamp", "rain jacket", "coffee grinder",
             "pair of boots", "bike helmet", "houseplant", "set of knives"],
    "chore": ["painting the kitchen", "cleaning the garage", "sorting old photos",
              "fixing the fence", "repotting plants", "assembling a bookshelf"],
    "appointment": ["dentist", "haircut", "eye test", "physio", "car service"],
    "project": ["jigsaw puzzle", "watercolour painting", "knitted scarf", "short story",
                "model airplane", "photo album"],
    "skill": ["bake sourdough bread", "play chess", "juggle", "code in Rust", "draw portraits",
              "make pottery"],
    "dislike": ["traffic jams", "cold weather", "loud restaurants", "early meetings",
                "crowded trains", "spam calls"],
}
_DISTRACTORS = (
    "I went {activity} with {companion} on {day}.", "I had {food} for {meal} today.",
    "I'm reading a book about {topic}.", "I watched a documentary about {topic} last night.",
    "I bought a new {item} yesterday.", "I cooked {food} for {meal} yesterday.",
    "I spent the weekend {chore}.", "I have a {appointment} appointment on {day}.",
    "I usually go {activity} on {day}s.", "I finished a {project} last week.",
    "I'm learning to {skill}.", "I hate {dislike}.", "I listened to a podcast about {topic}.",
    "I ordered a new {item} online.", "I went to a talk about {topic} on {day}.",
)
_CHITCHAT = (
    "How do I reverse a list in Python?", "Can you explain how {topic} work?",
    "Thanks, that helps!", "What's a good way to stay focused in the afternoon?",
    "Could you summarise the history of {topic} in three bullet points?",
    "Can you give me a quick recipe for {food}?", "Write a haiku about {topic}.",
    "What's the difference between a list and a tuple?", "Ok, thanks.",
    "How long should I boil an egg?", "Tell me a fun fact about {topic}.",
)


@dataclass(frozen=True, slots=True)
class Turn:
    id: str  # "<user>/s03/t012"
    session_id: str
    time: datetime
    text: str
    role: str = "user"
    states: tuple[str, str] | None = None  # (slot, value) this turn states, if any


@dataclass(frozen=True, slots=True)
class Question:
    turn_id: str  # the turn asking it
    text: str
    slot: str
    kind: str  # one of QUESTION_KINDS
    answer: tuple[str, ...]  # the value(s) current when asked
    evidence: tuple[str, ...]  # ids of the turns stating them


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    index: int
    start: datetime
    turns: tuple[Turn, ...]


@dataclass(frozen=True, slots=True)
class User:
    id: str
    sessions: tuple[Session, ...]
    questions: tuple[Question, ...]
    turns: dict[str, Turn] = field(default_factory=dict, compare=False)  # by id


@dataclass(slots=True)
class _Plan:
    """What happens to one slot of one user, session by session."""

    slot: Slot
    statements: list[tuple[int, str, str]]  # (session, value, template)
    questions: list[int]  # sessions asking about it


def generate(seed: int, *, users: int = 40, sessions: int = 12,
             distractors: tuple[int, int] = (16, 26), chitchat: tuple[int, int] = (4, 8),
             hard_share: float = 0.35) -> list[User]:
    """`users` users of `sessions` sessions each; the same seed gives the same dialogues.

    Each session has `distractors` (min, max) distractor statements, `hard_share` of them hard
    negatives of the user's slots, and `chitchat` (min, max) turns that state nothing.
    """
    if sessions < 3:
        raise ValueError("sessions must be at least 3")
    rng = random.Random(seed)
    return [_user(rng, f"u{seed}-{n:03d}", sessions, distractors, chitchat, hard_share)
            for n in range(users)]


def _plan(rng: random.Random, slot: Slot, sessions: int) -> _Plan:
    values = rng.sample(slot.values, 4)
    first = rng.randrange(0, sessions // 2)
    statements = [(first, values[0], rng.choice(slot.state))]
    if slot.multi:
        for value in values[1: rng.choice((2, 3))]:
            statements.append((rng.randrange(first, sessions - 1), value, rng.choice(slot.state)))
    else:
        current, at = values[0], first
        for value in values[1: 1 + rng.choice((0, 1, 1, 2))] if slot.correct else ():
            if at + 1 >= sessions - 1:
                break
            if rng.random() < 0.4:  # restated before it changes
                statements.append((rng.randrange(at + 1, sessions - 1), current, rng.choice(slot.state)))
            at = rng.randrange(at + 1, sessions - 1)
            current = value
            statements.append((at, value, rng.choice(slot.correct)))
        if rng.random() < 0.35 and at + 1 < sessions - 1:
            statements.append((rng.randrange(at + 1, sessions - 1), current, rng.choice(slot.state)))
    stated_in = {s for s, _, _ in statements}
    free = [s for s in range(first + 1, sessions) if s not in stated_in]
    last = max(stated_in)
    after_last = [s for s in free if s > last]
    questions = set(rng.sample(free, min(len(free), rng.choice((1, 2)))))
    if after_last:  # always ask once the final value is known
        questions.add(rng.choice(after_last))
    return _Plan(slot, sorted(statements), sorted(questions))


def _fill(rng: random.Random, template: str) -> str:
    out = template
    for key, words in _FILL.items():
        while "{" + key + "}" in out:
            out = out.replace("{" + key + "}", rng.choice(words), 1)
    return out


def _user(rng: random.Random, user_id: str, sessions: int, distractors: tuple[int, int],
          chitchat: tuple[int, int], hard_share: float) -> User:
    single = [s for s in SLOTS if not s.multi]
    chosen = rng.sample(single, rng.randint(7, 10)) + rng.sample([s for s in SLOTS if s.multi], 2)
    plans = [_plan(rng, slot, sessions) for slot in chosen]
    items: list[list[tuple[str, object]]] = [[] for _ in range(sessions)]
    for plan in plans:
        for session, value, template in plan.statements:
            items[session].append(("state", (plan, value, template.replace("{v}", value))))
        for session in plan.questions:
            items[session].append(("ask", plan))
    for session in range(sessions):
        for _ in range(rng.randint(*distractors)):
            if rng.random() < hard_share:  # a hard negative of one of this user's slots
                plan = rng.choice(plans)
                others = [v for v in plan.slot.values if v not in {s[1] for s in plan.statements}]
                text = rng.choice(plan.slot.hard_negatives).replace("{x}", rng.choice(others))
            else:
                text = _fill(rng, rng.choice(_DISTRACTORS))
            items[session].append(("say", text))
        for _ in range(rng.randint(*chitchat)):
            items[session].append(("say", _fill(rng, rng.choice(_CHITCHAT))))
    return _replay(rng, user_id, items)


def _replay(rng: random.Random, user_id: str, items: list[list[tuple[str, object]]]) -> User:
    """Lay out the turns in time and label each question with the history before it."""
    history: dict[str, list[tuple[str, str]]] = {}  # slot -> [(turn id, value)] so far
    out_sessions, questions, turns = [], [], {}
    day = 0
    for index, session_items in enumerate(items):
        rng.shuffle(session_items)
        session_id = f"{user_id}/s{index:02d}"
        start = START + timedelta(days=day, hours=rng.randint(0, 10))
        session_turns = []
        for n, (what, payload) in enumerate(session_items):
            turn_id, time = f"{session_id}/t{n:03d}", start + timedelta(minutes=n)
            if what == "state":
                plan, value, text = payload  # type: ignore[misc]
                turn = Turn(turn_id, session_id, time, text, states=(plan.slot.name, value))
                history.setdefault(plan.slot.name, []).append((turn_id, value))
            elif what == "ask":
                plan = payload  # type: ignore[assignment]
                turn = Turn(turn_id, session_id, time, rng.choice(plan.slot.questions))
                questions.append(_question(turn, plan.slot, history[plan.slot.name]))
            else:
                turn = Turn(turn_id, session_id, time, payload)  # type: ignore[arg-type]
            session_turns.append(turn)
            turns[turn_id] = turn
        out_sessions.append(Session(session_id, index, start, tuple(session_turns)))
        day += rng.randint(1, 6)
    return User(user_id, tuple(out_sessions), tuple(questions), turns)


def _question(turn: Turn, slot: Slot, history: list[tuple[str, str]]) -> Question:
    if slot.multi:
        answer = tuple(dict.fromkeys(v for _, v in history))
        evidence = tuple(t for t, _ in history)
        kind = "multi"
    else:
        current = history[-1][1]
        since = max(i for i, (_, v) in enumerate(history) if v != current) + 1 if any(
            v != current for _, v in history) else 0
        changed = since > 0
        evidence = tuple(t for t, _ in history[since:])  # the current value since it was set
        answer = (current,)
        kind = "corrected" if changed else ("restated" if len(evidence) > 1 else "stable")
    return Question(turn.id, turn.text, slot.name, kind, answer, evidence)
