"""A generated intent-classification task shaped like real customer data: short, varied messages, a long system
prompt shared by every row, a dozen labels of skewed sizes, and planted near-duplicates and contradictions whose
truth is known."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from itertools import product

from ftpipe.core.similarity import Settings, prompt_shingles

CARDS = ["card", "debit card", "credit card", "new card", "virtual card", "visa", "mastercard"]
PLACES = ["in Spain", "at the airport", "online", "abroad", "at a shop", "in Berlin", "on holiday", "at an ATM"]
WHEN = ["today", "yesterday", "last week", "this morning", "two days ago", "on Monday", "just now", "recently"]
TEMPLATES = {
    "activate_my_card": ["How do I activate my {card}", "my {card} arrived {when}, how do i turn it on",
                         "can't activate the {card} i got {when}", "what are the steps to activate a {card}"],
    "card_arrival": ["My {card} still hasn't arrived", "when will my {card} be delivered",
                     "ordered a {card} {when} and nothing yet", "how long does a {card} take to arrive"],
    "lost_or_stolen_card": ["I lost my {card} {place}", "someone stole my {card} {place} {when}",
                            "my {card} is missing since {when}", "please block my {card}, it was stolen {place}"],
    "card_payment_declined": ["why was my {card} declined {place}", "payment with my {card} failed {when}",
                              "the shop refused my {card} {place}", "{card} keeps getting declined"],
    "refund_not_showing_up": ["my refund from {when} is not showing", "where is the refund for my {card} purchase",
                              "refund {place} still missing from my account", "merchant refunded me {when} but I see nothing"],
    "request_refund": ["Please could you give me a refund", "I want my money back for a purchase {place}",
                       "how can I get a refund for something I bought {when}", "refund the payment I made {place}"],
    "terminate_account": ["How do I delete my account now", "close my account please", "i want to cancel my account {when}",
                          "how can i stop using this bank and close everything"],
    "age_limit": ["Can I open an account for my offspring?", "is there a minimum age to open an account",
                  "can my teenager get a {card}", "how old do you have to be for a {card}"],
    "exchange_rate": ["what exchange rate do you use {place}", "why is the rate worse when I pay {place}",
                      "how is the exchange rate calculated for my {card}", "rate for paying {place} {when} seems wrong"],
    "pin_blocked": ["my pin is blocked", "I entered the wrong pin {place} and now it's locked",
                    "how do I unblock the pin of my {card}", "pin locked after three tries {when}"],
    "top_up_failed": ["top up failed {when}", "my {card} top-up did not go through",
                      "why can't I top up with my {card}", "adding money {when} failed"],
    "transfer_not_received": ["the transfer I sent {when} did not arrive", "my friend never got my transfer",
                              "money sent {place} hasn't been received", "transfer pending since {when}"],
}
WEIGHTS = [14, 12, 10, 9, 8, 7, 6, 5, 4, 3, 2, 2]  # skewed label sizes
SYSTEM_PROMPT = (
    "You are the support assistant of a retail bank. Read the customer's message and classify it into exactly one "
    "of these intents: " + ", ".join(TEMPLATES) + ". Reply with the intent name only, in lower case, with no "
    "explanation, no punctuation and no other words. If the message fits several intents, pick the most specific."
)
FILLERS = ["please", "thanks", "asap", "help"]


@dataclass
class IntentTask:
    rows: list[dict]
    near_duplicates: dict[str, str] = field(default_factory=dict)  # planted row id -> id of the row it copies
    contradictions: dict[str, str] = field(default_factory=dict)  # planted row id -> id of the row it contradicts


def _row(message: str, label: str, source: str, system: str | None = SYSTEM_PROMPT) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": message}, {"role": "assistant", "content": label}]
    row_id = hashlib.sha256(repr(messages).encode()).hexdigest()[:16]
    return {"id": row_id, "messages": messages, "source": source}


def _messages(label: str, rng: random.Random) -> list[str]:
    slots = list(product(CARDS, PLACES, WHEN))
    rng.shuffle(slots)
    found = {t.format(card=c, place=p, when=w) for t in TEMPLATES[label] for c, p, w in slots[:12]}
    return sorted(found)


def _paraphrase(message: str, rng: random.Random) -> str:
    """A near-identical copy: other case, punctuation or spacing, and on a longer message one word more."""
    words = message.split()
    if len(words) >= 7:
        words.append(rng.choice(FILLERS))
    text = " ".join(words)
    return rng.choice([text.upper() + "?", text.capitalize() + "?", "  " + text + "!!", text.lower() + "."])


def misspelt(message: str) -> str:
    """`message` with a letter dropped from the middle of its longest word, as a hurried customer types it."""
    words = message.split()
    at = max(range(len(words)), key=lambda i: len(words[i]))
    words[at] = words[at][:len(words[at]) // 2] + words[at][len(words[at]) // 2 + 1:]
    return " ".join(words)


def misspelt_copies(rows: list[dict]) -> list[dict]:
    """A copy of each of `rows` (system prompt, user message, label) with its message `misspelt`, ids `typo-<n>`."""
    return [{**row, "id": f"typo-{i}", "source": f"more.csv:row {i + 2}",
             "messages": [*row["messages"][:-2], {"role": "user", "content": misspelt(row["messages"][-2]["content"])},
                          row["messages"][-1]]} for i, row in enumerate(rows)]


def _distinct(rows: list[dict], threshold: float) -> list[dict]:
    """The rows minus any whose message happens to be near-identical to an earlier one's, so the planted truth is
    all there is (checked pair by pair, without LSH)."""
    prompts, _ = prompt_shingles(rows, Settings().shingle_words)
    kept: list[int] = []
    for index in range(len(rows)):
        if all(prompts.jaccard(index, other) < threshold for other in kept):
            kept.append(index)
    return [rows[i] for i in kept]


def intent_task(rows: int = 600, *, near: int = 24, contradictions: int = 6, seed: int = 0,
                threshold: float = 0.8) -> IntentTask:
    """About `rows` distinct short messages over 12 labels, plus `near` planted near-duplicates (same label)
    and `contradictions` planted near-identical messages with another label."""
    rng = random.Random(seed)
    labels = list(TEMPLATES)
    pool = {label: _messages(label, rng) for label in labels}
    base = []
    for index in range(rows):
        label = rng.choices(labels, weights=WEIGHTS)[0]
        if pool[label]:
            base.append(_row(pool[label].pop(rng.randrange(len(pool[label]))), label, f"intents.csv:row {index + 2}"))
    task = IntentTask(_distinct(base, threshold))
    originals = rng.sample(task.rows, near + contradictions)
    for number, original in enumerate(originals):
        message, label = original["messages"][1]["content"], original["messages"][2]["content"]
        source = f"more.csv:row {number + 2}"
        if number < near:
            copy = _row(_paraphrase(message, rng), label, source)
            task.near_duplicates[copy["id"]] = original["id"]
        else:
            copy = _row(message.upper() + "?", rng.choice([name for name in labels if name != label]), source)
            task.contradictions[copy["id"]] = original["id"]
        task.rows.append(copy)
    return task


# Each label's customers ask one of its two core questions inside greetings, context and sign-offs that go with any.
CORES = {f"intent_{i:02d}": [f"I need help with product {chr(97 + i)} number one today",
                             f"where can I find the {chr(97 + i)} settings page"] for i in range(24)}
OPENERS = ["Hi", "Hello there", "Good morning", "Hey", "Dear support", "So"]
CONTEXT = ["I'm on the mobile app.", "I've been a customer for years.", "This is the second time I'm writing.",
           "Nobody answered the phone.", "I'm travelling next week.", ""]
CLOSERS = ["Thanks", "Regards, Tom", "Cheers", "Appreciate it", "thx", ""]
RUN_ON_CLOSERS = ["thanks", "thank you", "regards Tom", "cheers", "thx", "- sent from my phone", ""]  # no comma before


def wrapped_messages(n: int = 600, seed: int = 0, run_on: bool = False) -> list[tuple[str, str]]:
    """(message, label): a core question in random wrapping, each message distinct, 24 labels of skewed sizes;
    `run_on`: the greeting and sign-off written onto the question without punctuation, as chat messages often are."""
    rng = random.Random(seed)
    labels = list(CORES)
    found = []
    for i in range(n):
        label = rng.choices(labels, weights=range(len(labels), 0, -1))[0]
        core = rng.choice(CORES[label])
        message = (f"{rng.choice(OPENERS).lower()} {core} {rng.choice(RUN_ON_CLOSERS)}" if run_on else
                   f"{rng.choice(OPENERS)}, {core}? {rng.choice(CONTEXT)} {rng.choice(CLOSERS)}").strip()
        found.append((f"{message} (ticket {i})", label))
    return found
