"""Support emails shaped like real ones: a short question, in two rows of three between one of a few long greetings
and signatures (text too few rows hold to be shared text, enough to make any two questions in it look alike), with
planted copies (typos, another signature name) and contradictions (such a copy with another label)."""

from __future__ import annotations

import random

from ftpipe_tests.intents import IntentTask
from ftpipe_tests.rows import row

QUESTIONS = {
    "refund": ["Where is my refund for the order I returned?", "I still have not received my refund.",
               "When will the refund reach my card?"],
    "password": ["How do I reset my password?", "I forgot my password and cannot log in.",
                 "The password reset link does not work."],
    "shipping": ["My parcel has not arrived yet.", "Can you tell me where my package is?",
                 "The tracking number shows no updates."],
    "cancel": ["Please cancel my subscription.", "I want to cancel my order before it ships.",
               "How can I cancel my plan?"],
    "invoice": ["I need a copy of my invoice.", "The invoice has the wrong company name.",
                "Can you send the invoice as a PDF?"],
    "address": ["I need to change my delivery address.", "I moved, please update my address.",
                "Can I ship this order to a different address?"],
    "damaged": ["The item arrived broken.", "My order came damaged in the box.", "The screen was cracked on arrival."],
    "discount": ["My discount code is not accepted.", "The promo code gives an error at checkout.",
                 "Can I apply a coupon after paying?"],
}
WRAPPERS = [
    ("Hello team, I hope this message finds you well and that you are having a great week so far. I am writing to you "
     "today because I have an issue with my account that I would like some help with. {} Thank you very much in "
     "advance for your time and your help, I really appreciate it. Kind regards and have a lovely day, Sam"),
    ("Hi there, good morning to the whole support team, I hope everything is going well on your side. I have been a "
     "customer for many years and I need your assistance with the following. {} Looking forward to hearing back from "
     "you as soon as possible. Many thanks and best wishes from the whole family, Alex"),
]
TYPOS = {"refund": "refnd", "order": "ordr", "password": "pasword", "parcel": "parcle", "invoice": "invoce",
         "address": "adress", "arrived": "arived", "code": "cdoe", "cancel": "cancle", "package": "pakage",
         "tracking": "traking", "screen": "scren", "coupon": "cupon"}


def misspelt(question: str) -> str:
    """The question with its first word of `TYPOS` misspelt, and one more question mark."""
    word = next(word for word in TYPOS if word in question)
    return question.replace(word, TYPOS[word], 1) + "?"


def wrapped_emails(copies: int = 6, contradictions: int = 4, seed: int = 0) -> IntentTask:
    """Every question bare and in each wrapper (8 labels), then `copies` misspelt copies of wrapped emails with their
    label and `contradictions` with another label, the signature's name longer in each."""
    emails = [row(wrapper.format(question), label, f"mail {label} {number} {kind}")
              for label, questions in QUESTIONS.items() for number, question in enumerate(questions)
              for kind, wrapper in enumerate([*WRAPPERS, "{}"])]
    task = IntentTask(emails)
    rng = random.Random(seed)
    labels = list(QUESTIONS)
    for number, original in enumerate(rng.sample([e for e in emails if not e["source"].endswith(" 2")],
                                                 copies + contradictions)):
        label = original["messages"][-1]["content"]
        _, _, which, kind = original["source"].rsplit(" ", 3)
        wrapper = WRAPPERS[int(kind)].replace("Sam", "Samuel").replace("Alex", "Alexandra")
        message = wrapper.format(misspelt(QUESTIONS[label][int(which)]))
        if number < copies:
            copy = row(message, label, f"copy {number}")
            task.near_duplicates[copy["id"]] = original["id"]
        else:
            copy = row(message, rng.choice([name for name in labels if name != label]), f"mislabelled {number}")
            task.contradictions[copy["id"]] = original["id"]
        task.rows.append(copy)
    return task
