"""Generate the general-skills probe `general/probe.jsonl` used by the forgetting check (seeded, byte-identical).

    python data/generate_probe.py

Five skills, interleaved so any prefix of the file mixes them, each row with the check that suits it:
arithmetic and any question answered with a number only (`number`: the first number of the answer, so "7 is
larger than 25" is not 25), facts and reasoning (`contains`: the reference as whole words), instruction following
(`exact`: the answer is the reference, punctuation and case aside) and formatting (`exact_case`: the answer is the
reference, case included).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

SEED = 7
PROBE = Path(__file__).resolve().parent / "general" / "probe.jsonl"
ROWS_PER_SKILL = 64
NUMBER_ONLY = " Answer with the number only."  # such a row of any skill is checked by `number`, not as text

CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("the United Kingdom", "London"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("China", "Beijing"),
            ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
            ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Canada", "Ottawa"),
            ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Argentina", "Buenos Aires"),
            ("South Korea", "Seoul"), ("Cuba", "Havana"), ("Finland", "Helsinki"))
FACTS = (
    ("What color is the sky on a clear day?", "blue"), ("What color is fresh grass?", "green"),
    ("What planet do we live on?", "Earth"), ("What is frozen water called?", "ice"),
    ("What is the largest ocean on Earth?", "Pacific"), ("Which animal is called the king of the jungle?", "lion"),
    ("What is the opposite of hot?", "cold"), ("What is the opposite of up?", "down"),
    ("What is the largest planet in the solar system?", "Jupiter"), ("What do bees make?", "honey"),
    ("Which planet is closest to the Sun?", "Mercury"), ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("In which country are the pyramids of Giza?", "Egypt"), ("What is the chemical symbol for gold?", "Au"),
    ("What gas do plants take in from the air?", "carbon dioxide"), ("What is the color of a ripe banana?", "yellow"),
    ("Which animal gives us wool?", "sheep"), ("What is the opposite of day?", "night"),
    ("What is the star at the center of our solar system?", "Sun"), ("What do cows drink?", "water"),
    ("Which season comes after winter?", "spring"), ("What is the opposite of big?", "small"),
    ("Which bird is a symbol of peace?", "dove"), ("What is the hardest natural material?", "diamond"),
    ("What is the main language spoken in Mexico?", "Spanish"), ("Which organ pumps blood through the body?", "heart"),
)
NUMBER_FACTS = (
    ("How many days are in a week?", "7"), ("How many legs does a spider have?", "8"),
    ("How many months are in a year?", "12"), ("How many hours are in a day?", "24"),
    ("How many minutes are in an hour?", "60"), ("How many sides does a triangle have?", "3"),
    ("At how many degrees Celsius does water boil at sea level?", "100"), ("How many continents are there?", "7"),
    ("How many legs does a dog have?", "4"), ("How many sides does a square have?", "4"),
    ("How many seconds are in a minute?", "60"), ("How many wheels does a bicycle have?", "2"),
    ("How many days are in a leap year?", "366"), ("How many letters are in the English alphabet?", "26"),
)
REPLY_WORDS = ("yes", "hello", "blue", "ocean", "banana", "ready", "river", "tiger", "window", "garden", "silver",
               "candle", "mountain", "coffee", "rabbit", "planet")
REPEAT_PHRASES = ("the cat sat", "good morning", "open the door", "see you soon", "red apple", "happy birthday",
                  "thank you very much", "the sun is bright", "close the window", "time for lunch")
YES_NO = (("Is the sun hot?", "yes"), ("Can fish swim?", "yes"), ("Is snow black?", "no"), ("Do cats bark?", "no"),
          ("Is 10 greater than 3?", "yes"), ("Is 2 greater than 9?", "no"), ("Is ice cold?", "yes"),
          ("Can a car fly?", "no"), ("Is the sea salty?", "yes"), ("Do birds have feathers?", "yes"),
          ("Is a week longer than a month?", "no"), ("Is water wet?", "yes"))
PICK_ONE = (("a fruit", ("car", "apple", "chair"), "apple"), ("an animal", ("table", "horse", "book"), "horse"),
            ("a color", ("spoon", "shoe", "purple"), "purple"), ("a vegetable", ("carrot", "lamp", "sock"), "carrot"),
            ("a drink", ("milk", "brick", "pillow"), "milk"), ("a tool", ("hammer", "cloud", "song"), "hammer"),
            ("a bird", ("eagle", "stone", "shirt"), "eagle"), ("a number", ("seven", "glass", "tree"), "seven"))
SENTENCES = ("The dog likes to run", "Birds fly south in winter", "We ate bread for lunch",
             "My sister plays the piano", "The train leaves at noon", "She reads a book every night")
SAY_WORDS = ("goodbye", "thanks", "welcome", "sunshine", "forest", "pizza")
FORMAT_WORDS = ("apple", "house", "river", "green", "table", "music", "cloud", "pencil", "water", "light", "stone",
                "bread", "chair", "dream", "flame", "grape")
SHORT_WORDS = ("cat", "dog", "sun", "book", "pen", "hat", "cup", "box")
COMPOUNDS = (("sun", "flower"), ("rain", "bow"), ("foot", "ball"), ("tooth", "brush"), ("bed", "room"),
             ("snow", "man"))
WORD_TRIPLES = (("red", "green", "blue"), ("one", "two", "three"), ("cat", "dog", "bird"), ("up", "down", "left"),
                ("sun", "moon", "star"), ("milk", "tea", "juice"))
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
NAMES = ("Tom", "Ann", "Sam", "Lucy", "Ben", "Mia", "Leo", "Eva")
HEAVIER = (("a feather", "a brick", "brick"), ("an elephant", "a mouse", "elephant"), ("a car", "a bicycle", "car"),
           ("a pebble", "a boulder", "boulder"))
ODD_ONE_OUT = ((("apple", "banana", "hammer", "cherry"), "hammer"), (("dog", "cat", "horse", "table"), "table"),
               (("red", "blue", "chair", "green"), "chair"), (("car", "bus", "train", "banana"), "banana"))

ARITHMETIC = (  # (question, range of a, range of b, answer, share of the rows)
    ("What is {a} + {b}?", (2, 9), (2, 9), lambda a, b: a + b, 0.2),
    ("What is {a} plus {b}?", (11, 60), (11, 39), lambda a, b: a + b, 0.25),
    ("What is {a} - {b}?", (25, 99), (2, 15), lambda a, b: a - b, 0.25),
    ("What is {a} times {b}?", (2, 12), (5, 12), lambda a, b: a * b, 0.15),
    ("Tom has {a} apples and buys {b} more. How many apples does he have now?", (3, 15), (10, 20),
     lambda a, b: a + b, 0.15),
)


def arithmetic(rng: random.Random) -> list[tuple[str, str]]:
    """Distinct sums, differences and products with results of at least 10, computed here."""
    rows: dict[str, str] = {}
    for template, (a_low, a_high), (b_low, b_high), compute, share in ARITHMETIC:
        target = len(rows) + round(share * ROWS_PER_SKILL)
        while len(rows) < target:
            a, b = rng.randint(a_low, a_high), rng.randint(b_low, b_high)
            if compute(a, b) >= 10:
                rows.setdefault(template.format(a=a, b=b) + NUMBER_ONLY, str(compute(a, b)))
    return list(rows.items())


def facts(rng: random.Random) -> list[tuple[str, str]]:
    rows = [(f"What is the capital of {country}? Answer with the city's name only.", city)
            for country, city in CAPITALS]
    rows += [(f"{q} Answer with one word.", a) for q, a in FACTS]
    return rows + [(q + NUMBER_ONLY, a) for q, a in NUMBER_FACTS]


def instructions(rng: random.Random) -> list[tuple[str, str]]:
    rows = [(f"Reply with only the word {w}.", w) for w in REPLY_WORDS]
    rows += [(f"Repeat this phrase exactly: {p}", p) for p in REPEAT_PHRASES]
    rows += [(f"Answer yes or no: {q}", a) for q, a in YES_NO]
    rows += [(f"Which of these is {kind}: {', '.join(words)}? Answer with one word.", a) for kind, words, a in PICK_ONE]
    rows += [(f"What is the last word of this sentence: '{s}'? Answer with that word only.", s.split()[-1])
             for s in SENTENCES]
    rows += [(f"What is the first word of this sentence: '{s}'? Answer with that word only.", s.split()[0])
             for s in SENTENCES]
    return rows + [(f"Say the word '{w}' and nothing else.", w) for w in SAY_WORDS]


def formatting(rng: random.Random) -> list[tuple[str, str]]:
    rows = [(f"Write the word '{w}' in uppercase letters.", w.upper()) for w in FORMAT_WORDS[:8]]
    rows += [(f"Write the word '{w.upper()}' in lowercase letters.", w) for w in FORMAT_WORDS[8:]]
    rows += [(f"Write the word '{w}' three times, separated by spaces.", f"{w} {w} {w}") for w in SHORT_WORDS]
    rows += [(f"Spell the word '{w}' with a space between each letter.", " ".join(w)) for w in SHORT_WORDS]
    rows += [(f"Reverse the order of these words: {' '.join(t)}. Reply with the words only.", " ".join(t[::-1]))
             for t in WORD_TRIPLES]
    for _ in range(10):
        numbers = rng.sample(range(1, 30), 3)
        rows.append((f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}. "
                     "Reply with the numbers separated by spaces.", " ".join(map(str, sorted(numbers)))))
    rows += [(f"Join the words '{a}' and '{b}' into one word.", a + b) for a, b in COMPOUNDS]
    return rows + [("Write the numbers from 1 to 5 separated by spaces.", "1 2 3 4 5"),
                   ("Write the first three letters of the alphabet, separated by spaces.", "a b c"),
                   ("Write the number twelve using digits.", "12"), ("Write the number seven using digits.", "7")]


def reasoning(rng: random.Random) -> list[tuple[str, str]]:
    rows = [(f"Which day comes after {day}? Answer with one word.", DAYS[(i + 1) % 7]) for i, day in enumerate(DAYS)]
    rows += [(f"Which month comes after {month}? Answer with one word.", MONTHS[(i + 1) % 12])
             for i, month in enumerate(MONTHS)]
    for _ in range(14):
        a, b = rng.sample(range(2, 99), 2)
        rows.append((f"Which number is larger, {a} or {b}?{NUMBER_ONLY}", str(max(a, b))))
    for _ in range(12):
        tall, short = rng.sample(NAMES, 2)
        rows.append((f"{tall} is taller than {short}. Who is shorter? Answer with the name only.", short))
    rows += [(f"Which is heavier, {a} or {b}? Answer with one word.", answer) for a, b, answer in HEAVIER]
    rows += [(f"Which word does not belong: {', '.join(words)}? Answer with that word only.", answer)
             for words, answer in ODD_ONE_OUT]
    return rows + [(f"What letter comes after {letter} in the alphabet? Answer with the letter only.",
                    chr(ord(letter) + 1)) for letter in "CFKPT"]


SKILLS = {"arithmetic": (arithmetic, "number"), "facts": (facts, "contains"), "instruction": (instructions, "exact"),
          "formatting": (formatting, "exact_case"), "reasoning": (reasoning, "contains")}


def interleave(groups: dict[str, list]) -> list[tuple[str, int, object]]:
    """(group, position, item) of every group's items, group by group: any prefix mixes all groups."""
    return [(name, i, items[i]) for i in range(max(map(len, groups.values()), default=0))
            for name, items in groups.items() if i < len(items)]


def probe_rows(rng: random.Random) -> list[dict]:
    """Every skill's rows (shuffled, distinct questions), interleaved skill by skill."""
    skills = {}
    for name, (make, _) in SKILLS.items():
        rows = list(dict(make(rng)).items())
        rng.shuffle(rows)
        skills[name] = rows[:ROWS_PER_SKILL]
    return [{"id": f"{skill}-{i + 1:02d}", "skill": skill,
             "check": "number" if question.endswith(NUMBER_ONLY) else SKILLS[skill][1],
             "messages": [{"role": "user", "content": question}], "reference": reference}
            for skill, i, (question, reference) in interleave(skills)]


def main() -> None:
    rows = probe_rows(random.Random(SEED))
    PROBE.parent.mkdir(parents=True, exist_ok=True)
    PROBE.write_bytes("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
    print(f"probe: {PROBE} {len(rows)} rows {dict(Counter(row['skill'] for row in rows))}")


if __name__ == "__main__":
    main()
