"""Writes the multi-turn session files that `bench.py sessions` reads: each line is one chat session, a
list of grade-school word problems that the model answers one after another.

The problems come from the templates below with names and numbers drawn from a seeded generator, so the
files are reproducible: `python data/make_sessions.py` rewrites them byte for byte. Held-out sessions
(seeds 1000 + i) are what docs/evaluation.md's table reports; calibration sessions (seeds 0 + i) are the only
ones any setting may be chosen on (the first 4 were the calibration set of the oracle runs; 16 since). Both draw from the same templates with different names and numbers.
"""

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonah", "Kira", "Luis",
         "Maya", "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yara"]
ITEMS = ["marbles", "stickers", "apples", "pencils", "cards", "shells", "coins", "books", "stamps", "cookies"]

TEMPLATES = [
    "{a} has {x} {item}. {a} buys {y} more and then gives {z} to {b}. How many {item} does {a} have now? Think step by step.",
    "A shop sells {item} in packs of {x}. {a} buys {y} packs and shares them equally among {k} friends. How many does each friend get, and how many are left over? Explain your reasoning.",
    "{a} walks {x} km every weekday and {y} km on each day of the weekend. How many km does {a} walk in {k} weeks? Show each step.",
    "A train leaves at {h}:00 and travels for {x} minutes, stops for {y} minutes, then travels {z} more minutes. At what time does it arrive? Reason carefully.",
    "A rectangle is {x} cm long and {y} cm wide. A square has the same perimeter. What is the area of the square? Think step by step.",
    "{a} saves {x} dollars a week. {b} starts with {z} dollars and saves {y} dollars a week. After how many weeks do they have the same amount, if ever? Explain.",
    "A class has {x} students. {p} percent of them walk to school and the rest take the bus. How many take the bus? Show your work.",
    "{a} is {x} years old. {b} is {y} years older than {a}. In {k} years, what will be the sum of their ages? Think step by step.",
    "A recipe needs {x} grams of flour for {k} cakes. How much flour is needed for {y} cakes? Explain each step.",
    "A tank holds {x} litres. It is filled at {y} litres per minute and leaks {z} litres per minute. How long does it take to fill from empty? Reason carefully.",
    "{a} reads {x} pages a day. The book has {y} pages. On which day does {a} finish it, and how many pages are read on the last day? Show your reasoning.",
    "There are {x} red, {y} blue and {z} green balls in a bag. What fraction of the balls are not red? Simplify your answer and explain.",
    "A bike costs {x} dollars. It is on sale for {p} percent off, then a tax of 10 percent is added to the sale price. What is the final price? Think step by step.",
    "{a}, {b} and {c} share {x} {item} in the ratio 1 : 2 : 3, after {a} first keeps {k} for a friend. How many does each get? Explain.",
    "A farmer plants {x} rows of trees with {y} trees in each row. {z} trees die. The rest give {k} baskets of fruit each. How many baskets are there? Show each step.",
    "The sum of two numbers is {x} and their difference is {k}. What are the two numbers? Reason carefully.",
    "{a} runs a lap in {x} seconds and {b} runs a lap in {y} seconds. They start together. After how many seconds are they together at the start again? Explain.",
    "A bus has {x} passengers. At the first stop {y} get off and {z} get on. At the second stop half of the passengers get off. How many are left? Think step by step.",
    "A garden is {x} m by {y} m. A path {k} m wide runs all around the inside edge. What area is left for planting? Show your reasoning.",
    "{a} buys {k} notebooks at {x} cents each and pays with a {y}-dollar note. How much change does {a} get? Explain each step.",
    "A clock gains {k} minutes every hour. It is set right at noon. What time does it show when the real time is {h} pm? Reason carefully.",
    "A box holds {x} {item}. {a} fills {k} boxes and has {z} {item} left over. How many {item} did {a} have at the start? Think step by step.",
    "In a game, a win gives 3 points, a draw 1 and a loss 0. A team played {x} games, won {k} and lost {z}. How many points does it have? Explain.",
    "The average of {k} numbers is {x}. One more number, {y}, is added. What is the new average? Show your work.",
]


def problem(rng: random.Random, template: str) -> str:
    a, b, c = rng.sample(NAMES, 3)
    return template.format(a=a, b=b, c=c, item=rng.choice(ITEMS), x=rng.randint(12, 90), y=rng.randint(3, 40),
                           z=rng.randint(2, 11), k=rng.randint(2, 9), p=rng.choice([10, 20, 25, 40, 75]),
                           h=rng.randint(1, 11))


def session(seed: int, turns: int = 14) -> dict:
    rng = random.Random(seed)
    return {"seed": seed, "turns": [problem(rng, t) for t in rng.sample(TEMPLATES, turns)]}


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    here = Path(__file__).resolve().parent
    for name, first, n in [("sessions_heldout.jsonl", 1000, 16), ("sessions_calibration.jsonl", 0, 16)]:
        lines = [json.dumps(session(first + i)) for i in range(n)]
        (here / name).write_text("\n".join(lines) + "\n")
        print(f"wrote {n} sessions to {here / name}")


if __name__ == "__main__":
    main()
