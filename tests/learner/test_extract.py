"""What the learner remembers from a user message, and what it must never remember."""

from __future__ import annotations

import pytest

from learner.extract import Fact, extract_facts


def _contents(message: str) -> list[str]:
    return [fact.content for fact in extract_facts(message)]


# (user message, stored content, kind)
STATEMENTS = [
    ("I'm allergic to peanuts", "The user is allergic to peanuts.", "fact"),
    ("I am a nurse", "The user is a nurse.", "fact"),
    ("My dog is called Biscuit", "The user's dog is called Biscuit.", "fact"),
    ("my name is Ada", "The user's name is Ada.", "fact"),
    ("I prefer tabs over spaces", "The user prefers tabs over spaces.", "preference"),
    ("I live in Paris", "The user lives in Paris.", "fact"),
    ("I work at Acme", "The user works at Acme.", "fact"),
    ("I use Neovim", "The user uses Neovim.", "fact"),
    ("I have two kids", "The user has two kids.", "fact"),
    ("I don't eat meat", "The user doesn't eat meat.", "negation"),
    ("I can't swim", "The user can't swim.", "negation"),
    ("I know Python and Rust", "The user knows Python and Rust.", "skill"),
    ("I speak French", "The user speaks French.", "skill"),
    ("I moved to Berlin last year", "The user moved to Berlin last year.", "event"),
    ("I started a new job", "The user started a new job.", "event"),
    # preferences
    ("I love hiking in the Alps", "The user loves hiking in the Alps.", "preference"),
    ("I really like jazz", "The user really likes jazz.", "preference"),
    ("I hate cilantro", "The user hates cilantro.", "preference"),
    ("I enjoy long walks", "The user enjoys long walks.", "preference"),
    ("I dislike crowded places", "The user dislikes crowded places.", "preference"),
    ("My favorite color is blue", "The user's favorite color is blue.", "preference"),
    ("I'm a big fan of jazz", "The user is a big fan of jazz.", "preference"),
    # skills
    ("I can cook Thai food", "The user can cook Thai food.", "skill"),
    ("I'm fluent in Spanish", "The user is fluent in Spanish.", "skill"),
    # events
    ("I was born in 1990", "The user was born in 1990.", "event"),
    ("I quit smoking last year", "The user quit smoking last year.", "event"),
    ("I'm getting married next month", "The user is getting married next month.", "event"),
    # negations
    ("I'm not a morning person", "The user is not a morning person.", "negation"),
    ("I never eat meat", "The user never eats meat.", "negation"),
    ("I have no siblings", "The user has no siblings.", "negation"),
    ("I don't like mushrooms", "The user doesn't like mushrooms.", "negation"),
    # possessions and attributes of the user
    ("My wife's name is Sara", "The user's wife's name is Sara.", "fact"),
    ("My dog's a beagle", "The user's dog is a beagle.", "fact"),
    ("My birthday is in May", "The user's birthday is in May.", "fact"),
    ("My hobbies include chess", "The user's hobbies include chess.", "fact"),
    # facts
    ("I've been a vegetarian for ten years",
     "The user has been a vegetarian for ten years.", "fact"),
    ("I'm from Brazil", "The user is from Brazil.", "fact"),
    ("I'm 34", "The user is 34.", "fact"),
    ("I have type I diabetes", "The user has type I diabetes.", "fact"),
]


@pytest.mark.parametrize(("message", "content", "kind"), STATEMENTS,
                         ids=[s[0] for s in STATEMENTS])
def test_first_person_statement_becomes_a_third_person_fact(message, content, kind):
    assert extract_facts(message) == [Fact(content=content, kind=kind, evidence=message)]


# (first-person verb, third-person form) through "I <verb> things regularly"
VERB_AGREEMENT = [
    ("have", "has"), ("do", "does"), ("go", "goes"), ("am", "is"),
    ("watch", "watches"), ("wash", "washes"), ("fix", "fixes"), ("buzz", "buzzes"),
    ("miss", "misses"), ("study", "studies"), ("play", "plays"), ("feed", "feeds"),
    ("live", "lives"), ("moved", "moved"), ("was", "was"), ("taught", "taught"),
]


@pytest.mark.parametrize(("verb", "third_person"), VERB_AGREEMENT,
                         ids=[v for v, _ in VERB_AGREEMENT])
def test_verb_agrees_with_the_user(verb, third_person):
    expected = f"The user {third_person} things regularly."
    assert _contents(f"I {verb} things regularly") == [expected]


# first-person words left inside the statement become third person
REWRITES = [
    ("I taught myself Python", "The user taught themselves Python."),
    ("My dog follows me everywhere", "The user's dog follows the user everywhere."),
    ("I live with my parents", "The user lives with the user's parents."),
    ("I lent a book of mine to Bob", "The user lent a book of the user's to Bob."),
    ("I live in Oslo and I work at Acme", "The user lives in Oslo and the user works at Acme."),
    ("I have a cat, and I'm allergic to dogs",
     "The user has a cat, and the user is allergic to dogs."),
]


@pytest.mark.parametrize(("message", "content"), REWRITES, ids=[m for m, _ in REWRITES])
def test_remaining_first_person_words_become_third_person(message, content):
    assert _contents(message) == [content]


NEVER_STORED = [
    # questions, with and without a question mark
    "Am I allergic to peanuts?",
    "I live in Paris?",
    "What is my name",
    "How do I cook rice",
    "Can I swim after eating",
    "Should I move to Berlin",
    "Is my diet healthy",
    "Do I need a visa for Japan",
    "Why do I always feel tired",
    "Which editor should I use",
    # hypotheticals and conditionals
    "If I were a nurse I would work nights",
    "Suppose I lived in Paris",
    "Imagine I'm a pilot",
    "I would love a cat",
    "I'd go to Japan",
    "I might move to Spain",
    "I could learn Rust",
    "I wish I had a dog",
    "I'll be in Tokyo next week",
    # requests and talk about the conversation
    "I want you to write a poem",
    "I need you to summarize the article",
    "I'd like a summary",
    "I'm looking for a good recipe",
    "I'm trying to fix my code",
    "I was wondering about taxes",
    "I wonder why the sky is blue",
    "I think Python is great",
    "I guess we should start",
    "I mean the other function",
    "I hope the weather is nice",
    "I see what you mean",
    "I understand the answer now",
    "I'm not sure about taxes",
    "I don't know how to cook",
    "I'm sorry for the confusion",
    "I'm confused by the docs",
    "I have a question about Rust",
    "I'm asking for a friend",
    "I just moved to Berlin",
    "I got an error when running pip",
    "I'm getting a weird result",
    "I'm running into a timeout",
    "I tried restarting the server",
    "I have to work tomorrow",
    "I love this",
    "I'm tired",
    # other people's facts
    "My friend is allergic to shellfish",
    "My boss lives in London",
    "My mom likes gardening",
    "My best friends are doctors",
    "My parents live in Rome",
    "My brother's kids are noisy",
    "My sister and I live in Lyon",
    # talk about the user's code, not the user
    "My code doesn't work",
    "My question is about taxes",
    # reported speech, quotes and code
    "He said I'm a nurse",
    'She told me "I am a pilot"',
    '"I love cats," she said.',
    "He wrote “I live in Rome” to me",
    "She called me 'a person who loves cats'",
    "I use `rm -rf` daily",
    "```\nI am a pilot\nI live in Rome\n```",
    "```python\n# I am a pilot\n",
    # memlane's own injected context echoed back
    "<memlane_memories>\n- The user is allergic to peanuts.\nI am a pilot.\n</memlane_memories>",
    "<user_profile>I am a pilot. I live in Rome.</user_profile>",
    "<user_profile>\nI am a pilot.",
    "The user is allergic to peanuts.",
    "- The user lives in Paris. I am a pilot.",
    # too short, too long, unfinished
    "I agree",
    "I like",
    "I " + "really " * 40 + "like cats",
    "My favorite food is:",
]


@pytest.mark.parametrize("message", NEVER_STORED, ids=NEVER_STORED)
def test_message_yields_no_fact(message):
    assert extract_facts(message) == []


# (message, stored contents in order)
SPLITTING = [
    ("I love cats! I hate dogs.", ["The user loves cats.", "The user hates dogs."]),
    ("I love cats.I hate dogs", ["The user loves cats.", "The user hates dogs."]),
    ("I live in Oslo\nI work at Acme", ["The user lives in Oslo.", "The user works at Acme."]),
    ("I live in Oslo; I work at Acme", ["The user lives in Oslo.", "The user works at Acme."]),
    ("- I live in Oslo\n* I use Neovim\n• I speak French\n1. I have two kids",
     ["The user lives in Oslo.", "The user uses Neovim.", "The user speaks French.",
      "The user has two kids."]),
    ("I use many editors, e.g. Vim and Emacs. I live in Oslo.",
     ["The user uses many editors, e.g. Vim and Emacs.", "The user lives in Oslo."]),
    ("I weigh 72.5 kg. I live in Oslo.", ["The user weighs 72.5 kg.", "The user lives in Oslo."]),
    ("Also, I live in Oslo. Btw my name is Ada.",
     ["The user lives in Oslo.", "The user's name is Ada."]),
    ("<memlane_memories>I am a pilot.</memlane_memories> I live in Oslo.",
     ["The user lives in Oslo."]),
    ("Here is my script:\n```\nI am a pilot\n```\nI work at Acme.", ["The user works at Acme."]),
    ("He wrote “I am a pilot. I live in Rome.” to me. I live in Oslo.",
     ["The user lives in Oslo."]),
]


@pytest.mark.parametrize(("message", "contents"), SPLITTING, ids=[m for m, _ in SPLITTING])
def test_each_sentence_is_judged_on_its_own(message, contents):
    assert _contents(message) == contents


def test_mixed_message_yields_only_the_fact():
    message = (
        "I'm allergic to peanuts. Can you suggest a dessert for tonight? "
        "I want you to keep the recipe short."
    )
    assert extract_facts(message) == [
        Fact("The user is allergic to peanuts.", "fact", "I'm allergic to peanuts.")
    ]


def test_same_fact_is_stored_once():
    assert _contents("I live in Oslo. Oh, and I live in Oslo!") == ["The user lives in Oslo."]


def test_content_is_capitalised_and_ends_with_one_period():
    assert _contents("i live in oslo!!!") == ["The user lives in oslo."]


def test_evidence_is_the_original_sentence():
    (fact,) = extract_facts("Hi! Btw, I’m allergic to peanuts.")
    assert fact.evidence == "Btw, I'm allergic to peanuts."


def test_sentence_over_200_characters_is_not_stored():
    long_place = "a village " + "very " * 40 + "far away"
    assert extract_facts(f"I live in {long_place}") == []
    assert _contents("I live in a village far away") == ["The user lives in a village far away."]


def test_now_before_the_verb_keeps_the_verb_agreeing():
    assert [f.content for f in extract_facts("I now live in Berlin")] == ["The user now lives in Berlin."]
