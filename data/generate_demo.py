"""Generate the demo task `tasks/ticket_triage/` (the general-skills probe has its own `generate_probe.py`).

Support tickets are labelled with one line of JSON, ``{"category": ..., "priority": ...}``, and
spread over four raw files in four formats. Exact duplicates, near-duplicates, contradicting
labels and malformed rows are planted on purpose so that every data-cleaning stage has work to do.
`raw/preferences.jsonl` holds preference pairs for the DPO stage: the correct triage over a wrong field, a
chatty answer or broken JSON, with duplicate, reversed and malformed pairs planted the same way.

Deterministic: ``python data/generate_demo.py`` rewrites byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SEED = 1234
DATA = Path(__file__).resolve().parent
TASK = DATA / "tasks" / "ticket_triage"

CATEGORIES = ("billing", "technical", "account", "shipping", "feature_request")
PRIORITIES = ("low", "medium", "high")
SYSTEM_PROMPT = 'Triage the ticket. Reply with JSON: {"category": ..., "priority": ...}.'
INSTRUCTION = "Triage this support ticket."
BASE_ROWS = {"tickets_chat.jsonl": 160, "tickets_alpaca.json": 110, "tickets_export.csv": 110, "helpdesk.parquet": 100}
PLAIN_FILES = ("tickets_chat.jsonl", "tickets_export.csv", "helpdesk.parquet")  # prompt = ticket text
MAX_WORDS = 60
MAX_BASE_SIMILARITY = 0.5  # word-trigram Jaccard between two distinct base tickets

# ---------------------------------------------------------------- ticket vocabulary

PRODUCTS = ("Nimbus CRM", "LedgerLite", "PixelPad", "TaskHive", "Orbit Mail", "CloudDesk", "Quill Notes",
            "StreamBox", "Beacon Analytics", "FormFlow")
ITEMS = ("standing desk", "office chair", "laptop stand", "USB-C dock", "desk lamp", "webcam",
         "mechanical keyboard", "monitor arm", "coffee grinder", "ergonomic mouse")
FEATURES = ("a dark mode", "CSV export for reports", "keyboard shortcuts", "a calendar integration",
            "bulk editing", "scheduled sending", "an offline mode", "custom dashboards",
            "two-way sync with spreadsheets", "more chart types")
ERRORS = ("Error 500: Internal Server Error", "Connection timed out", "Something went wrong (code 0x80070005)",
          "Invalid session token", "Upload failed: file too large", "SyncError: conflict detected")
PLATFORMS = ("Windows 11", "macOS", "an Android phone", "an iPhone", "Chrome on Linux", "Firefox")
PLANS = ("Starter", "Pro", "Business", "Team")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
NAMES = ("Maria", "James", "Aisha", "Tom", "Priya", "Lukas", "Chen", "Sofia", "Omar", "Emma", "Diego",
         "Hannah", "Kenji", "Fatima", "Noah", "Ines")
SURNAMES = ("Lopez", "Smith", "Khan", "Becker", "Patel", "Rossi", "Nguyen", "Okafor", "Silva", "Novak")
GREETINGS = ("", "", "Hi,", "Hello,", "Hi team,", "Hello support,", "Hey there,", "Good morning,",
             "Dear support team,")
SIGNOFFS = ("", "", "Thanks.", "Thank you!", "Thanks, {name}", "Regards, {name} {surname}", "Cheers, {name}",
            "Best, {name}")

ISSUES = {
    "billing": (
        "I was charged twice for my {product} subscription this month ({amount} each).",
        "My invoice from {date} shows {amount}, but my {plan} plan should only cost {amount2}.",
        "I cancelled {product} on {date} and would like a refund of the {amount} charge.",
        "My card keeps getting declined when I try to pay the {product} invoice.",
        "Can you send a corrected invoice with our company VAT number for the {amount} payment?",
        "You billed me {amount} for {product} after my free trial, even though I never upgraded.",
        "The refund for my {product} plan ({amount}) still hasn't reached my bank account.",
        "Why did my {product} payment go up from {amount2} to {amount}? Nobody told me about a price change.",
    ),
    "technical": (
        "{product} crashes every time I open the reports page.",
        'I keep getting the error "{error}" when I try to save in {product}.',
        "Sync between {product} and my phone stopped working after the latest update.",
        "The {product} API has been returning timeouts for about {minutes} minutes.",
        "{product} is extremely slow today, pages take over {seconds} seconds to load.",
        'Uploading files in {product} fails with "{error}".',
        "After updating {product}, the app only shows a blank white screen.",
        "Notifications from {product} stopped arriving and the calendar integration throws errors.",
    ),
    "account": (
        "I can't reset my {product} password, the reset email never arrives.",
        "Please change the email address on my {product} account to {email}.",
        "My {product} account got locked after too many login attempts.",
        "I lost my phone and can't get past two-factor authentication on {product}.",
        "How do I add {n} new team members to our {product} account?",
        "Please delete my {product} account and all my personal data.",
        "I need to transfer ownership of our {product} workspace to a colleague.",
        "I can't log in to {product} with my username {username} anymore, it says the account doesn't exist.",
    ),
    "shipping": (
        "My order {order} for the {item} still hasn't arrived, it was due on {date}.",
        "The tracking number for order {order} hasn't updated in {days} days.",
        "The {item} from order {order} arrived damaged, the box was crushed in transit.",
        "I need to change the delivery address for order {order} before it ships.",
        "I ordered {a_item} in order {order} but received {a_item2} instead.",
        "The courier marked order {order} as delivered, but nothing came to my door.",
        "Can you ship order {order} with express delivery instead of standard shipping?",
        "Part of order {order} is missing, only the {item} was in the package.",
    ),
    "feature_request": (
        "It would be great if {product} had {feature}.",
        "Could you please add {feature} to {product}?",
        "Feature request: {feature} in {product}.",
        "Are there any plans to support {feature} in {product}? We'd really use it.",
        "I'd love to see {feature} in the next {product} release.",
        "Suggestion for {product}: {feature} would save us a lot of time.",
    ),
}
DETAILS = {
    "billing": ("I'm on the {plan} plan.", "Our account is billed annually.", "The charge was made on {date}.",
                "I've attached a screenshot of my bank statement."),
    "technical": ("I'm using {platform}.", "I already tried clearing the cache and reinstalling.",
                  "It started after the update on {date}.", "Other people on my team see the same thing."),
    "account": ("My username is {username}.", "I'm the admin of our {plan} workspace.",
                "I signed up with {email}.", "I've been a customer since {month}."),
    "shipping": ("I ordered it on {date}.", "I paid for standard shipping.", "I've already contacted the courier.",
                 "It's my second order with you this month."),
    "feature_request": ("We're a team of {n} on the {plan} plan.", "Several of our users have asked for this.",
                        "Other tools we use already have this.", "Otherwise we really like {product}."),
}
CUES = {
    "high": ("This is urgent, our whole team is blocked.", "URGENT: we need this fixed today.",
             "Our production system is down because of this.",
             "Please treat this as critical, we are losing sales every hour.",
             "I need this resolved ASAP, it's an emergency.",
             "This is blocking {n} people right now, please escalate."),
    "medium": ("It's not critical, but please look into it this week.",
               "It's annoying and affects a few people on our team.",
               "Could you get back to me in the next couple of days?",
               "We can work around it for now, but we'd like a fix soon.",
               "Please look into this when you can, ideally this week.",
               "Not an emergency, but it's been happening for a few days."),
    "low": ("No rush, whenever you get a chance.", "Just a minor thing, low priority.",
            "Not urgent at all, just letting you know.", "Whenever you have time is fine.",
            "No hurry on this one.", "Take your time, it's not blocking anything."),
}
CUES_BY_CATEGORY = {
    ("shipping", "high"): ("This is urgent, I need it for an event tomorrow.",
                           "URGENT: it's a gift and I need it by tomorrow.",
                           "Please escalate, our office can't work without it and I need it ASAP."),
    ("feature_request", "high"): ("This is urgent for us: our contract renewal next week depends on it.",
                                  "It's a blocker for our rollout, so please treat it as urgent."),
    ("feature_request", "medium"): ("It would make a real difference for our team this quarter.",
                                    "Could you let us know this week whether it's on the roadmap?",
                                    "A few people on our team keep asking for it."),
}
PRIORITY_WEIGHTS = {"feature_request": (0.45, 0.4, 0.15)}

# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """A well-formed example: the ticket text and the one-line JSON answer."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Raw:
    """A malformed row, stored exactly as given (a text line for JSONL, else a record)."""

    value: object
    kind: str


def answer(category: str, priority: str) -> str:
    return json.dumps({"category": category, "priority": priority})


def shingles(text: str, k: int = 3) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + k]) for i in range(max(1, len(words) - k + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def slots(rng: random.Random) -> dict[str, str]:
    """Random values for every template placeholder."""
    name, surname = rng.choice(NAMES), rng.choice(SURNAMES)
    item, item2 = rng.sample(ITEMS, 2)
    price = rng.randint(12, 199)
    return {
        "product": rng.choice(PRODUCTS), "item": item, "a_item": with_article(item), "a_item2": with_article(item2),
        "feature": rng.choice(FEATURES), "error": rng.choice(ERRORS), "platform": rng.choice(PLATFORMS),
        "plan": rng.choice(PLANS), "order": f"#{rng.randint(10000, 99999)}",
        "amount": f"${price}.{rng.choice(('00', '99', '50'))}", "amount2": f"${rng.randint(5, price - 1)}.00",
        "date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}", "month": rng.choice(MONTHS),
        "n": str(rng.randint(3, 40)), "minutes": str(rng.randint(10, 90)), "seconds": str(rng.randint(10, 45)),
        "days": str(rng.randint(3, 12)), "name": name, "surname": surname,
        "email": f"{name.lower()}.{surname.lower()}@example.com", "username": f"{name.lower()}{rng.randint(1, 99)}",
    }


def continue_sentence(text: str) -> str:
    """Lower-case the first letter after an inline greeting ("Hi, the ..."), unless it starts a name or acronym."""
    first = text.split(" ", 1)[0]
    keep = first[:2].isupper() or first[1:2] in ("", "'") or any(p.startswith(first) for p in PRODUCTS)
    return text if keep else text[0].lower() + text[1:]


def make_ticket(rng: random.Random) -> tuple[str, str, str]:
    """(ticket text, category, priority): topic keywords give the category, an urgency cue the priority."""
    category = rng.choice(CATEGORIES)
    priority = rng.choices(PRIORITIES, weights=PRIORITY_WEIGHTS.get(category, (1, 1, 1)))[0]
    values = slots(rng)
    issue = rng.choice(ISSUES[category]).format(**values)
    detail = rng.choice(DETAILS[category]).format(**values) if rng.random() < 0.5 else ""
    cue = rng.choice(CUES_BY_CATEGORY.get((category, priority), CUES[priority])).format(**values)
    body = " ".join(p for p in ([cue, issue, detail] if rng.random() < 0.3 else [issue, detail, cue]) if p)
    greeting, signoff = rng.choice(GREETINGS), rng.choice(SIGNOFFS).format(**values)
    separator = "\n" if rng.random() < 0.15 else " "
    if greeting and separator == " ":
        body = continue_sentence(body)
    return separator.join(p for p in (greeting, body, signoff) if p), category, priority


def base_tickets(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """`count` distinct tickets, none a near-duplicate of another."""
    tickets: list[tuple[str, str, str]] = []
    seen: list[set] = []
    while len(tickets) < count:
        ticket = make_ticket(rng)
        grams = shingles(ticket[0])
        if len(ticket[0].split()) < MAX_WORDS and all(jaccard(grams, other) < MAX_BASE_SIMILARITY for other in seen):
            tickets.append(ticket)
            seen.append(grams)
    return tickets


# ---------------------------------------------------------------- planted problems


def typo(rng: random.Random, text: str) -> str:
    """Swap two adjacent letters inside one longer word."""
    words = text.split(" ")
    choices = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 5 and len(set(w[1:-1])) > 1]
    i = rng.choice(choices)
    word = words[i]
    j = rng.choice([j for j in range(1, len(word) - 2) if word[j] != word[j + 1]])
    words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


WORD_SWAPS = (("Hi,", "Hello,"), ("Hello,", "Hi,"), ("please", "kindly"), ("can't", "cannot"), ("I'd", "I would"),
              ("Thanks.", "Thank you."), ("still", "yet to be"), ("really", "definitely"), ("every", "each"),
              ("urgent", "very urgent"), ("but", "though"), ("my", "our"))


def changed_word(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    options = [(i, new) for i, w in enumerate(words) for old, new in WORD_SWAPS if w == old]
    if not options:
        return typo(rng, text)
    i, new = rng.choice(options)
    return " ".join(words[:i] + [new] + words[i + 1 :])


def punctuation(rng: random.Random, text: str) -> str:
    if text.endswith("."):
        return text[:-1] + rng.choice(("!", "!!", "..."))
    return text + rng.choice(("!", " :)", "?"))


NEAR_EDITS = (typo, changed_word, punctuation)


def case_or_space(rng: random.Random, text: str) -> str:
    """A variant equal to `text` once case is folded and whitespace collapsed."""
    variant = rng.choice(("lower", "upper", "spaces", "edges"))
    if variant == "lower":
        return text.lower()
    if variant == "upper":
        return text.upper()
    if variant == "spaces":
        return "  ".join(text.split())
    return f"  {text}\n"


def other_label(rng: random.Random, category: str, priority: str) -> str:
    """A plausible but different label: another priority, or another category."""
    if rng.random() < 0.5:
        return answer(category, rng.choice([p for p in PRIORITIES if p != priority]))
    return answer(rng.choice([c for c in CATEGORIES if c != category]), priority)


def malformed_rows(rng: random.Random) -> dict[str, list[Raw]]:
    """Rows each reader must quarantine, with a short description of the defect."""
    def ticket() -> tuple[str, str]:
        text, category, priority = make_ticket(rng)
        return text, answer(category, priority)

    (t1, a1), (t2, a2), (t3, a3), (t4, a4), (t5, a5), (t6, a6), (t7, a7) = (ticket() for _ in range(7))
    line = json.dumps({"messages": [{"role": "user", "content": t1}, {"role": "assistant", "content": a1}]})
    return {
        "tickets_chat.jsonl": [
            Raw(line[: len(line) // 2], "broken JSON line (truncated)"),
            Raw('{"messages": [{"role": "user", "content": "My invoice is wrong"}, {"role": "assistant"',
                "broken JSON line"),
            Raw({"messages": [{"role": "user", "content": t2}]}, "chat without an assistant turn"),
            Raw({"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": t3}]},
                "chat without an assistant turn"),
            Raw({"messages": [{"role": "customer", "content": t4}, {"role": "assistant", "content": a4}]},
                "unknown role"),
            Raw({"messages": [{"role": "user", "content": t5}, {"role": "agent", "content": a5}]}, "unknown role"),
            Raw({"messages": [{"role": "user", "content": t6}, {"role": "assistant", "content": ""}]},
                "empty assistant answer"),
            Raw({"messages": t7}, "messages is not a list"),
        ],
        "tickets_alpaca.json": [
            Raw({"instruction": INSTRUCTION, "input": ticket()[0], "output": 3}, "output is a number"),
            Raw({"instruction": INSTRUCTION, "input": ticket()[0], "output": ["billing", "high"]}, "output is a list"),
            Raw({"instruction": INSTRUCTION, "input": ticket()[0], "output": ""}, "empty output"),
            Raw({"instruction": INSTRUCTION, "input": ticket()[0]}, "missing output"),
            Raw({"instruction": None, "input": ticket()[0], "output": a2}, "instruction is null"),
        ],
        "tickets_export.csv": [
            Raw(["", a3], "empty prompt"),
            Raw(["   ", a4], "blank prompt"),
            Raw([ticket()[0], ""], "empty completion"),
            Raw([ticket()[0], "technical", "high"], "more fields than the header"),
        ],
        "helpdesk.parquet": [
            Raw({"ticket_text": ticket()[0], "triage": None}, "null completion"),
            Raw({"ticket_text": " ", "triage": a5}, "blank prompt"),
            Raw({"ticket_text": None, "triage": a6}, "null prompt"),
        ],
    }


def plant(rng: random.Random, files: dict[str, list], labels: dict[int, tuple[str, str]]) -> Counter:
    """Add duplicates, near-duplicates, contradictions and malformed rows to `files`; return the counts."""
    origin = [(name, row) for name, rows in files.items() for row in rows]
    order = list(range(len(origin)))
    rng.shuffle(order)
    planted: Counter = Counter()

    def take(plain: bool = False) -> tuple[str, Row, int]:
        while True:
            index = order.pop()
            name, row = origin[index]
            if not plain or name in PLAIN_FILES:
                return name, row, index

    def plant_target(name: str) -> str:
        return rng.choice(PLAIN_FILES) if name in PLAIN_FILES else name

    for _ in range(14):
        name, row, _ = take()
        files[name].append(row)
        planted["exact duplicate: verbatim, same file"] += 1
    for _ in range(14):
        name, row, _ = take()
        files[name].append(Row(case_or_space(rng, row.prompt), row.completion))
        planted["exact duplicate: case/whitespace variant"] += 1
    for _ in range(12):
        name, row, _ = take(plain=True)
        files[rng.choice([f for f in PLAIN_FILES if f != name])].append(row)
        planted["exact duplicate: copy in another file"] += 1
    for i in range(40):
        name, row, _ = take()
        edit = NEAR_EDITS[i % len(NEAR_EDITS)]
        files[plant_target(name)].append(Row(edit(rng, row.prompt), row.completion))
        planted[f"near duplicate: {edit.__name__.replace('_', ' ')}"] += 1
    for i in range(15):
        name, row, index = take()
        if i < 8:  # two rows agree, one disagrees: the majority answer is kept
            files[plant_target(name)].append(row)
            planted["contradiction group: 2 agree, 1 disagrees"] += 1
        else:
            planted["contradiction group: 1 vs 1 (tied)"] += 1
        files[plant_target(name)].append(Row(row.prompt, other_label(rng, *labels[index])))
    for name, rows in malformed_rows(rng).items():
        files[name].extend(rows)
        planted.update(f"malformed ({name}): {row.kind}" for row in rows)
    return planted


# ---------------------------------------------------------------- writers


def chat_line(rng: random.Random, row: Row | Raw) -> str:
    if isinstance(row, Raw):
        return row.value if isinstance(row.value, str) else json.dumps(row.value, ensure_ascii=False)
    system = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
    messages = system + [{"role": "user", "content": row.prompt}, {"role": "assistant", "content": row.completion}]
    return json.dumps({"messages": messages}, ensure_ascii=False)


def write_chat(rng: random.Random, rows: list, path: Path) -> None:
    path.write_bytes("".join(chat_line(rng, row) + "\n" for row in rows).encode("utf-8"))


def write_alpaca(rng: random.Random, rows: list, path: Path) -> None:
    records = [row.value if isinstance(row, Raw) else
               {"instruction": INSTRUCTION, "input": row.prompt, "output": row.completion} for row in rows]
    path.write_bytes((json.dumps(records, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


def write_csv(rng: random.Random, rows: list, path: Path) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["prompt", "completion"])
    writer.writerows(r.value if isinstance(r, Raw) else [r.prompt, r.completion] for r in rows)
    path.write_bytes(buffer.getvalue().encode("utf-8"))


def write_parquet(rng: random.Random, rows: list, path: Path) -> None:
    records = []
    for number, row in enumerate(rows, start=1):
        fields = row.value if isinstance(row, Raw) else {"ticket_text": row.prompt, "triage": row.completion}
        records.append({"ticket_id": f"HD-{4000 + number}", **fields, "agent": rng.choice(NAMES)})
    schema = pa.schema([("ticket_id", pa.string()), ("ticket_text", pa.string()), ("triage", pa.string()),
                        ("agent", pa.string())])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)


PREFERENCE_PAIRS = 600
REJECTED_KINDS = ("wrong priority", "wrong priority", "wrong category", "chatty", "broken JSON")  # mostly the subtle


def rejected_answer(rng: random.Random, kind: str, category: str, priority: str) -> str:
    """A worse answer than the correct triage: another priority or category, a chatty reply or JSON that does not
    parse."""
    if kind == "wrong priority":
        return answer(category, rng.choice([p for p in PRIORITIES if p != priority]))
    if kind == "wrong category":
        return answer(rng.choice([c for c in CATEGORIES if c != category]), priority)
    if kind == "chatty":
        return (f"Sure! This looks like a {category.replace('_', ' ')} ticket, and I'd say the priority is "
                f"{priority}. Let me know if you need anything else!")
    return answer(category, priority)[: -rng.randint(1, 3)]


def preference_pairs(rng: random.Random) -> tuple[list[object], Counter]:
    """Preference rows (prompt, chosen, rejected) on fresh tickets, with planted problems; and their counts."""
    pairs, planted = [], Counter()
    for text, category, priority in base_tickets(rng, PREFERENCE_PAIRS):
        kind = rng.choice(REJECTED_KINDS)
        pairs.append({"prompt": text, "chosen": answer(category, priority),
                      "rejected": rejected_answer(rng, kind, category, priority)})
        planted[f"pair: correct over {kind}"] += 1
    for pair in rng.sample(pairs, 6):
        pairs.append(dict(pair))
        planted["pair: exact duplicate"] += 1
    for pair in rng.sample(pairs[:PREFERENCE_PAIRS], 4):
        pairs.append({**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]})
        planted["pair: reversed (a tied contradiction)"] += 1
    pairs.append({"prompt": pairs[0]["prompt"], "chosen": pairs[0]["chosen"], "rejected": pairs[0]["chosen"]})
    pairs.append({"prompt": pairs[1]["prompt"], "chosen": pairs[1]["chosen"], "rejected": ""})
    planted["pair: malformed (chosen equals rejected, empty side)"] += 2
    return pairs, planted


def write_preferences(rng: random.Random, path: Path) -> Counter:
    pairs, planted = preference_pairs(rng)
    rng.shuffle(pairs)
    path.write_bytes("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs).encode("utf-8"))
    return planted


WRITERS = {"tickets_chat.jsonl": write_chat, "tickets_alpaca.json": write_alpaca,
           "tickets_export.csv": write_csv, "helpdesk.parquet": write_parquet}

TASK_YAML = """\
# Demo task: triage customer support tickets into a category and a priority.
# Raw rows live in raw/ (JSONL chat, Alpaca JSON, CSV prompt/completion and a Parquet export);
# data/generate_demo.py writes this folder.
description: >-
  Triage support tickets: reply with one line of JSON giving the ticket's category
  (billing, technical, account, shipping, feature_request) and priority (low, medium, high).

data:
  format: auto                  # each row's format is recognised from its keys
  # Added to rows without a system message (most rows; some chat rows carry the same one).
  system_prompt: '{system_prompt}'
  columns:                      # helpdesk.parquet uses its own column names
    prompt: ticket_text
    completion: triage

dedup:
  near_threshold: 0.8           # Jaccard of word bigrams, on what varies between rows (the system prompt is left out)
  max_removed_share: 0.25       # the demo plants duplicates and contradictions in 19 % of its rows (22 % of one label)

split:
  eval_fraction: 0.15           # held-out rows, assigned by content hash
  seed: 0

base_model: smollm2-135m-instruct

# Sized for the 135M base model on a CPU: one epoch over ~500 short rows in a few minutes.
training:
  method: auto                  # lora on CPU, qlora on a CUDA GPU
  lora:
    r: 16
    alpha: 32
    dropout: 0.05
    target_modules: [q_proj, k_proj, v_proj, o_proj]   # attention only: learns the task, keeps general skills
  learning_rate: 0.0005         # high for LoRA, for a short run on a small model
  epochs: 1
  max_steps: 36                 # stop after 36 steps (288 rows, a fifth of them replayed): ~6 minutes on 2 CPU cores
  replay: 0.2                   # mix the base model's own answers to general prompts (a fifth of the train rows)
                                # into training, so the model keeps its general skills
  batch_size: 8
  max_length: 256               # tokens; tickets are under 60 words
  eval_steps: 18
  logging_steps: 5
  stages: [sft]                 # [sft, dpo]: then DPO from the SFT model on raw/preferences.jsonl (the correct
                                # triage over worse ones); see the README's Preference tuning

evaluation:
  task_type: classification     # accuracy (and macro-F1) on one JSON field of the answer
  label_field: category
  max_new_tokens: 24            # one line of JSON
"""


def write_task(rng: random.Random) -> dict[str, int]:
    """Write task.yaml and raw/; return the rows written per file."""
    tickets = base_tickets(rng, sum(BASE_ROWS.values()))
    files: dict[str, list] = {}
    labels: dict[int, tuple[str, str]] = {}
    start = 0
    for name, count in BASE_ROWS.items():
        files[name] = [Row(text, answer(c, p)) for text, c, p in tickets[start : start + count]]
        labels.update({start + i: (c, p) for i, (_, c, p) in enumerate(tickets[start : start + count])})
        start += count
    planted = plant(rng, files, labels)
    (TASK / "raw").mkdir(parents=True, exist_ok=True)
    (TASK / "task.yaml").write_bytes(TASK_YAML.replace("{system_prompt}", SYSTEM_PROMPT).encode("utf-8"))
    for name, rows in files.items():
        rng.shuffle(rows)
        WRITERS[name](rng, rows, TASK / "raw" / name)
    planted.update(write_preferences(random.Random(SEED + 1), TASK / "raw" / "preferences.jsonl"))
    print("planted:")
    for kind, count in planted.items():
        print(f"  {kind:62} {count}")
    return {name: len(rows) for name, rows in files.items()}


def main() -> None:
    rows = write_task(random.Random(SEED))
    print(f"rows per file ({sum(rows.values())} in all):")
    for name, count in rows.items():
        print(f"  raw/{name:58} {count}")


if __name__ == "__main__":
    main()
