"""Regenerate the built-in task data in cl_runner/tasks/builtin/data/ (deterministic, seeded).

    python scripts/make_builtin_data.py [--out DIR]

The word-position tasks show the same kind of input (a list of five words) under different
instructions ("reply with the second word", "... the last word"), so training one overwrites
the others: sequential LoRA forgets. The base SmolLM2-135M-Instruct is near chance on them.
``general_instructions`` (replay data) and ``general_probe`` (held-out probe) are short
instructions whose answers code can check; they share no item.

The ``mixed_skills`` tasks differ in their inputs and in the form of their answers (a sum, a
word spelt backwards, a continent, a reformatted date, a sentiment label), so training one
disturbs the others only in part: every task is multiple choice, each with its own distractors.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Nouns that SmolLM2's tokenizer encodes as one token each, so choice scoring is one forward pass.
WORDS = (
    "cat dog fox owl pig hen bee ant bat rat lion bear wolf horse mouse snake fish bird apple corn "
    "rice bean milk bread red blue green gold tree rock sand lake moon star rain snow"
).split()
POSITIONS = {"second_word": 1, "third_word": 2, "fourth_word": 3, "last_word": 4}
LIST_LENGTH = 5
SPLIT_SIZES = {"train": 400, "test": 60}

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Ireland", "Dublin"),
    ("China", "Beijing"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"),
    ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Thailand", "Bangkok"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("old", "new"), ("early", "late"), ("full", "empty"), ("high", "low"), ("wet", "dry"),
    ("left", "right"), ("hard", "soft"), ("strong", "weak"), ("rich", "poor"), ("long", "short"), ("loud", "quiet"),
    ("day", "night"), ("yes", "no"), ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("inside", "outside"),
]
# Which continent is a country in: six multi-token choices, one a word-prefix of another
# ("North America" / "South America" share "America"), for multiple-choice scoring and its benchmark.
CONTINENTS = ["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]
COUNTRY_CONTINENT = {
    "Africa": "Nigeria Egypt Kenya Ethiopia Ghana Morocco Algeria Tunisia Senegal Uganda Tanzania Angola Zambia Zimbabwe Cameroon Mali Sudan Namibia Botswana Rwanda Madagascar Somalia Libya",
    "Asia": "Japan China India Thailand Vietnam Indonesia Pakistan Bangladesh Nepal Mongolia Iran Iraq Malaysia Singapore Philippines Cambodia Laos Kazakhstan Uzbekistan Afghanistan Jordan Israel",
    "Europe": "France Germany Italy Spain Portugal Norway Sweden Finland Poland Austria Hungary Greece Ireland Belgium Netherlands Denmark Switzerland Romania Ukraine Croatia Serbia Iceland",
    "North America": "Canada Mexico Cuba Guatemala Honduras Jamaica Panama Nicaragua Haiti Belize",
    "South America": "Brazil Argentina Chile Peru Colombia Venezuela Ecuador Bolivia Paraguay Uruguay",
    "Oceania": "Australia Fiji Samoa Tonga Vanuatu",
}
SPELL_WORDS = "table chair window garden pencil orange silver rabbit castle bottle winter summer planet forest".split()


def word_position_records(task: str, size: int, rng: random.Random) -> list[dict]:
    position = POSITIONS[task]
    records = []
    for _ in range(size):
        words = rng.sample(WORDS, LIST_LENGTH)
        records.append({"words": words, "answer": words[position]})
    return records


def instruction_items(rng: random.Random) -> list[dict]:
    """Every general instruction item, shuffled once; the probe and the replay set split it."""
    items = [{"instruction": f"What is the capital of {c}? Answer with the city name only.", "response": city} for c, city in CAPITALS]
    items += [{"instruction": f"What is the opposite of the word '{a}'? Answer with one word.", "response": b} for a, b in OPPOSITES]
    items += [{"instruction": f"Write the word '{w}' in capital letters.", "response": w.upper()} for w in SPELL_WORDS]
    sums = {(a, b) for a in range(2, 20) for b in range(2, 20)}
    for a, b in sorted(rng.sample(sorted(sums), 40)):
        items.append({"instruction": f"What is {a} plus {b}? Answer with the number only.", "response": str(a + b)})
    rng.shuffle(items)
    return items


def country_continent_records(rng: random.Random) -> list[dict]:
    records = [{"country": c, "continent": continent, "choices": CONTINENTS} for continent, names in COUNTRY_CONTINENT.items() for c in names.split()]
    rng.shuffle(records)
    return records


MIXED_SPLIT_SIZES = {"train": 160, "test": 40}
BACKWARD_WORDS = (
    "lamp desk road ship frog milk tent coin drum kite nest ring salt sock star wind bell cake door fork "
    "gate hill iron jar king leaf mask nail pond rope seed tool vase wall yarn bowl card dust flag harp"
).split()
POSITIVE = "wonderful delightful excellent charming superb lovely brilliant pleasant".split()
NEGATIVE = "terrible dreadful awful boring dismal horrible tedious unpleasant".split()
NOUNS = "film meal hotel concert book service trip show game album".split()


def _choices(answer: str, distractors: list[str], rng: random.Random, count: int = 4) -> list[str]:
    options = [answer] + [d for d in dict.fromkeys(distractors) if d != answer][: count - 1]
    rng.shuffle(options)
    return options


def two_digit_sum_records(size: int, rng: random.Random) -> list[dict]:
    records = []
    for _ in range(size):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        total = a + b
        options = _choices(str(total), [str(total + d) for d in rng.sample([-10, -1, 1, 10, 2, -2], 4)], rng)
        records.append({"a": a, "b": b, "answer": str(total), "choices": options})
    return records


def word_backwards_records(size: int, rng: random.Random) -> list[dict]:
    records = []
    for _ in range(size):
        word, other = rng.sample(BACKWARD_WORDS, 2)
        backwards = word[::-1]
        options = _choices(backwards, [word, backwards[1] + backwards[0] + backwards[2:], other[::-1]], rng)
        records.append({"word": word, "answer": backwards, "choices": options})
    return records


def date_format_records(size: int, rng: random.Random) -> list[dict]:
    records = []
    for _ in range(size):
        year, month, day = rng.randint(1990, 2029), rng.randint(1, 12), rng.randint(13, 28)  # day > 12: DD/MM and MM/DD differ
        answer = f"{day:02d}/{month:02d}/{year}"
        options = _choices(answer, [f"{month:02d}/{day:02d}/{year}", f"{year}/{month:02d}/{day:02d}", f"{day:02d}-{month:02d}-{year}"], rng)
        records.append({"date": f"{year}-{month:02d}-{day:02d}", "answer": answer, "choices": options})
    return records


def review_sentiment_records(size: int, rng: random.Random) -> list[dict]:
    records = []
    for _ in range(size):
        label = rng.choice(["positive", "negative"])
        first, second = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
        records.append({"review": f"The {rng.choice(NOUNS)} was {first} and {second}.", "answer": label, "choices": ["positive", "negative"]})
    return records


MIXED_TASKS = {"two_digit_sum": two_digit_sum_records, "word_backwards": word_backwards_records, "date_format": date_format_records,
               "review_sentiment": review_sentiment_records}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")


def generate(out: Path, seed: int = 1234) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in POSITIONS:
        for split, size in SPLIT_SIZES.items():
            rng = random.Random(f"{seed}-{task}-{split}")
            path = out / f"{task}.{split}.jsonl"
            write_jsonl(path, word_position_records(task, size, rng))
            written.append(path)
    items = instruction_items(random.Random(f"{seed}-instructions"))
    probe_size = 40
    for name, records in (("general_probe.test", items[:probe_size]), ("general_instructions.train", items[probe_size:])):
        path = out / f"{name}.jsonl"
        write_jsonl(path, records)
        written.append(path)
    path = out / "country_continent.test.jsonl"
    write_jsonl(path, country_continent_records(random.Random(f"{seed}-country-continent")))
    written.append(path)
    for task, make in MIXED_TASKS.items():
        for split, size in MIXED_SPLIT_SIZES.items():
            path = out / f"{task}.{split}.jsonl"
            write_jsonl(path, make(size, random.Random(f"{seed}-{task}-{split}")))
            written.append(path)
    countries = country_continent_records(random.Random(f"{seed}-continent-of"))  # 92: 60 to learn, 32 to test
    for split, records in (("train", countries[:60]), ("test", countries[60:])):
        path = out / f"continent_of.{split}.jsonl"
        write_jsonl(path, records)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "cl_runner" / "tasks" / "builtin" / "data")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    for path in generate(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()
