"""Generate `general/replay_prompts.jsonl`, the general prompts whose base-model answers `training.replay` mixes
into a training (seeded, byte-identical).

    python data/generate_replay.py

Six kinds, interleaved so any prefix of the file mixes them: facts, arithmetic, instruction following,
formatting, reasoning and short explanations. Every item and phrasing differs from the general-skills probe
(`general/probe.jsonl`), so training on these answers never rehearses a probe question.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from generate_probe import interleave

SEED = 11
PROMPTS = Path(__file__).resolve().parent / "general" / "replay_prompts.jsonl"
ROWS_PER_KIND = 56

COUNTRIES = ("Chile", "Jamaica", "India", "Australia", "Kazakhstan", "Turkey", "the Netherlands", "Belgium", "Denmark",
             "Hungary", "Switzerland", "Colombia", "Vietnam", "Indonesia", "Nigeria", "Morocco", "New Zealand",
             "the Philippines", "Iceland", "Ghana")
QUESTIONS = (
    "Which animal is known for its very long neck?", "What do caterpillars turn into?",
    "Which metal is liquid at room temperature?", "What is the largest desert in the world?",
    "Which musical instrument has 88 keys?", "Who wrote the play Romeo and Juliet?",
    "What is the tallest mountain on Earth?", "Which planet is known as the Red Planet?",
    "What is the main ingredient of guacamole?", "What do you call a baby cat?", "What is the largest mammal?",
    "Which vitamin does the skin make in sunlight?", "How many strings does a standard guitar have?",
    "What is the smallest prime number?", "In which year did people first walk on the Moon?",
    "What is the longest river in Africa?", "Which organ do we use to breathe?", "What is the currency of Japan?",
    "Which gas makes up most of the air we breathe?", "What is the boiling point of water in Fahrenheit?",
    "How many players does a football team have on the field?", "Which shape has six sides?",
    "Who painted the Mona Lisa?", "What instrument measures temperature?", "Which insect makes silk?",
    "What is the closest star to Earth after the Sun?", "Which ocean lies between Africa and Australia?",
    "What is the fastest land animal?", "Which element has the chemical symbol O?",
    "What do we call an animal that eats only plants?",
)
ABOUT_COUNTRY = ("On which continent is {}?", "What is the official language of {}?", "Which currency is used in {}?")

NAMES = ("Priya", "Omar", "Julia", "Kenji", "Nora", "Diego", "Amara", "Felix")
CONTAINERS = (("box", "boxes", "pencils"), ("crate", "crates", "bottles"), ("bag", "bags", "marbles"),
              ("shelf", "shelves", "books"), ("tray", "trays", "cookies"))

ACKNOWLEDGE = ("acknowledged", "understood", "confirmed", "noted", "done", "okay")
RHYMES = ("cake", "bell", "boat", "hill", "coin", "mask", "nail", "rope")
CATEGORIES = ("fruits", "musical instruments", "countries in Europe", "kitchen tools", "farm animals", "sports",
              "vegetables", "jobs")
STATEMENTS = ("The Earth orbits the Sun.", "Spiders are insects.", "A year has four seasons.",
              "Penguins can fly long distances.", "Salt dissolves in water.", "The Moon is larger than the Earth.",
              "Sound travels faster than light.", "Whales are mammals.")
PHRASES = ("Knowledge is power", "Every cloud has a silver lining", "Practice makes perfect",
           "Actions speak louder than words", "Better late than never", "Time flies when you are busy")
LETTERS = "BDGLMRSW"

LIST_ITEMS = (("butter", "eggs", "flour"), ("stapler", "notebook", "ruler"), ("tent", "torch", "map"),
              ("salt", "pepper", "basil"), ("violin", "flute", "drum"), ("oak", "pine", "maple"))
TITLES = ("the old lighthouse keeper", "a walk in the park", "notes from a small island", "the secret garden gate",
          "learning to cook at home", "a guide to city cycling")
SNAKE = ("user account id", "total order price", "last login date", "max retry count", "first name field")
JSON_PAIRS = (("city", "Lisbon"), ("age", 31), ("color", "teal"), ("status", "active"), ("score", 88),
              ("animal", "otter"))
STEPS = ("make tea", "plant a seed", "wash your hands", "send a letter", "boil an egg", "pack a suitcase")
DATES = (("March", 14, 2021), ("July", 4, 1999), ("November", 30, 2010), ("January", 2, 2024), ("August", 19, 2005),
         ("May", 27, 2016))

AGES = (("Rosa", "Ivan", "Chen"), ("Paul", "Grace", "Tariq"), ("Lena", "Marco", "Aisha"), ("Hugo", "Zoe", "Ravi"))
LONGER = (("a canal", "a puddle"), ("a century", "a decade"), ("a marathon", "a sprint"), ("a train", "a scooter"),
          ("a novel", "a postcard"))
SYLLOGISMS = (("roses", "flowers", "this plant", "rose"), ("sparrows", "birds", "Pip", "sparrow"),
              ("squares", "rectangles", "this shape", "square"), ("trout", "fish", "Finn", "trout"))

WHY = ("leaves change color in autumn", "ice floats on water", "we have day and night", "bread dough rises",
       "metal feels colder than wood", "people wear sunscreen", "plants need sunlight",
       "the Moon seems to change shape", "we brush our teeth", "rainbows appear after rain")
WHAT_IS = ("a volcano", "a passport", "a compass", "a library", "photosynthesis", "a vaccine", "an atom",
           "a budget", "a recipe", "gravity")
TIPS = ("sleeping well", "saving money", "learning a new language", "staying focused while studying",
        "keeping a plant alive", "writing a clear email", "preparing for a job interview", "drinking enough water")
TO_SUMMARIZE = ("The library will close early on Friday because the heating system is being repaired. It will open "
                "at the usual time on Saturday.",
                "Our team finished the project two days ahead of schedule, and the client asked us to start a "
                "second project next month.",
                "Heavy snow blocked the mountain road overnight, so the school bus will take the longer route "
                "through the valley today.",
                "The bakery on Elm Street now sells gluten-free bread on weekends, and customers can order it "
                "online the day before.")
INFORMAL = ("hey, can u send me the report asap?", "gonna be late, traffic is awful", "thx for the help yesterday!",
            "the meeting got moved to 3, ok?")


def facts(rng: random.Random) -> list[str]:
    rows = [f"Which city is the capital of {country}?" for country in COUNTRIES]
    rows += [question.format(country) for country in rng.sample(COUNTRIES, 10) for question in ABOUT_COUNTRY]
    return rows + list(QUESTIONS)


def arithmetic(rng: random.Random) -> list[str]:
    rows = []
    for _ in range(10):
        rows.append(f"Calculate {rng.randint(13, 29)} multiplied by {rng.randint(3, 9)}.")
        rows.append(f"What do you get when you subtract {rng.randint(20, 90)} from {rng.randint(120, 400)}?")
        rows.append(f"Add {rng.randint(101, 499)} and {rng.randint(101, 499)}.")
        divisor = rng.randint(3, 9)
        rows.append(f"What is {divisor * rng.randint(4, 15)} divided by {divisor}?")
        name, (one, many, things) = rng.choice(NAMES), rng.choice(CONTAINERS)
        rows.append(f"Each {one} holds {rng.randint(6, 24)} {things}. {name} has {rng.randint(3, 8)} full {many}. "
                    f"How many {things} is that?")
        rows.append(f"{rng.choice(NAMES)} had {rng.randint(30, 80)} stickers and gave away {rng.randint(5, 25)}. "
                    "How many stickers are left?")
    rows += [f"What is {n} squared?" for n in rng.sample(range(13, 31), 6)]
    percents = zip((10, 25, 50, 20, 75), rng.sample(range(2, 20), 5))
    return rows + [f"What is {p} percent of {40 * n}?" for p, n in percents]


def instructions(rng: random.Random) -> list[str]:
    rows = [f"Respond with the single word '{word}' and no punctuation." for word in ACKNOWLEDGE]
    rows += [f"Give me two words that rhyme with '{word}'." for word in RHYMES]
    rows += [f"List three {category}, separated by commas." for category in CATEGORIES]
    rows += [f"True or false: {statement}" for statement in STATEMENTS]
    rows += [f"How many words are in this sentence: '{phrase}'?" for phrase in PHRASES]
    rows += [f"Name an animal whose name starts with the letter {letter}." for letter in LETTERS]
    rows += [f"Write one short sentence that uses the word '{word}'." for word in rng.sample(RHYMES, 6)]
    return rows + [f"Write the word '{word}' backwards, letter by letter." for word in rng.sample(RHYMES, 6)]


def formatting(rng: random.Random) -> list[str]:
    rows = [f"Format these items as a bulleted list: {', '.join(items)}." for items in LIST_ITEMS]
    rows += [f"Rewrite '{title}' in title case." for title in TITLES]
    rows += [f"Convert '{phrase}' to snake_case." for phrase in SNAKE]
    rows += [f"Give a JSON object with the key \"{key}\" set to {json.dumps(value)}." for key, value in JSON_PAIRS]
    rows += [f"Write the date {month} {day}, {year} as YYYY-MM-DD." for month, day, year in DATES]
    rows += [f"Spell out the number {n} in English words." for n in rng.sample(range(21, 999), 6)]
    rows += [f"Put the word '{word}' inside double quotation marks." for word in rng.sample(RHYMES, 5)]
    start = rng.sample(range(10, 60), 6)
    rows += [f"Count from {a} to {a + 4}, putting a comma between the numbers." for a in start]
    return rows + [f"Make a numbered list of the first three steps to {task}." for task in STEPS]


def reasoning(rng: random.Random) -> list[str]:
    weekdays = ("Monday", "Wednesday", "Friday", "Sunday")
    rows = [f"If today is {day}, what day will it be in {k} days?" for day in weekdays for k in (2, 3)]
    rows += [f"{a} is older than {b}, and {b} is older than {c}. Who is the youngest?" for a, b, c in AGES]
    rows += [f"{c} is younger than {b}, and {b} is younger than {a}. Who is the oldest?" for a, b, c in AGES]
    rows += [f"Which usually lasts or stretches longer, {a} or {b}?" for a, b in LONGER]
    rows += [f"All {group} are {kind}. If {name} is a {single}, is it one of the {kind}?"
             for group, kind, name, single in SYLLOGISMS]
    for _ in range(8):
        start, step = rng.randint(1, 20), rng.randint(2, 7)
        rows.append(f"What number comes next: {', '.join(str(start + step * i) for i in range(4))}, ...?")
    for _ in range(8):
        numbers = rng.sample(range(100, 999), 3)
        rows.append(f"Of {numbers[0]}, {numbers[1]} and {numbers[2]}, which is the smallest?")
    for _ in range(6):
        hour, trip = rng.randint(6, 14), rng.randint(2, 5)
        rows.append(f"A train departs at {hour}:30 and the journey takes {trip} hours. When does it arrive?")
    return rows + [f"I have {n} socks. How many complete pairs can I make?" for n in rng.sample(range(9, 40), 5)]


def explanations(rng: random.Random) -> list[str]:
    rows = [f"In one sentence, explain why {topic}." for topic in WHY]
    rows += [f"Briefly describe what {thing} is." for thing in WHAT_IS]
    rows += [f"Give one practical tip for {activity}." for activity in TIPS]
    rows += [f"Summarize in one sentence: {text}" for text in TO_SUMMARIZE]
    return rows + [f"Rewrite this message in a polite, formal tone: \"{text}\"" for text in INFORMAL]


KINDS = {"facts": facts, "arithmetic": arithmetic, "instruction": instructions, "formatting": formatting,
         "reasoning": reasoning, "explanation": explanations}


def replay_prompts(rng: random.Random) -> list[dict]:
    """Every kind's prompts (shuffled, distinct, at most ROWS_PER_KIND), interleaved kind by kind."""
    kinds = {}
    for name, make in KINDS.items():
        prompts = list(dict.fromkeys(make(rng)))
        rng.shuffle(prompts)
        kinds[name] = prompts[:ROWS_PER_KIND]
    return [{"id": f"{kind}-{i + 1:02d}", "messages": [{"role": "user", "content": prompt}]}
            for kind, i, prompt in interleave(kinds)]


def main() -> None:
    rows = replay_prompts(random.Random(SEED))
    PROMPTS.write_bytes("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
    print(f"replay prompts: {PROMPTS} {len(rows)} rows {dict(Counter(row['id'].split('-')[0] for row in rows))}")


if __name__ == "__main__":
    main()
