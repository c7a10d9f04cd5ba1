"""Generate the built-in counterfactual edit set (cl_runner/tasks/builtin/data/counterfacts.jsonl).

Records follow CounterFact's schema: ``requested_rewrite`` (prompt with ``{}``, subject,
target_new, target_true), ``paraphrase_prompts`` (the relation in other words),
``neighborhood_prompts`` (the relation's main prompt with other subjects that share the true
answer, as CounterFact builds them: what makes specificity hard) and ``generation_prompts``.
Facts are written by hand below, in relations where many subjects share an answer; the new
target is another answer of the same relation, drawn with a seeded generator.

``--mark-known`` then scores every request's rewrite prompt with SmolLM2-135M-Instruct and
sets ``base_prefers_true`` where the base model gives " target_true" a lower mean per-token NLL
than " target_new" (tests/test_edit_data.py checks those again).

    python scripts/make_edit_data.py --mark-known
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "cl_runner" / "tasks" / "builtin" / "data" / "counterfacts.jsonl"

# relation -> (rewrite prompt, paraphrase prompts, {answer: subjects})
RELATIONS = {
    "official_language": (
        "The official language of {} is",
        ["In {}, the language spoken officially is", "People in {} mostly speak the language called"],
        {
            "French": ["France", "Senegal", "Monaco", "Ivory Coast", "Mali"],
            "Spanish": ["Spain", "Mexico", "Argentina", "Colombia", "Peru", "Chile", "Cuba", "Venezuela", "Bolivia", "Uruguay"],
            "Portuguese": ["Portugal", "Brazil", "Angola", "Mozambique"],
            "English": ["the United Kingdom", "the United States", "Australia", "New Zealand", "Jamaica"],
            "Arabic": ["Egypt", "Saudi Arabia", "Morocco", "Iraq", "Syria", "Jordan", "Libya", "Yemen"],
            "German": ["Germany", "Austria", "Liechtenstein"],
            "Italian": ["Italy", "San Marino"],
            "Russian": ["Russia", "Belarus"],
            "Japanese": ["Japan"], "Korean": ["South Korea", "North Korea"], "Dutch": ["the Netherlands", "Suriname"],
            "Greek": ["Greece", "Cyprus"], "Turkish": ["Turkey"], "Swedish": ["Sweden"], "Polish": ["Poland"],
            "Persian": ["Iran"], "Finnish": ["Finland"], "Hungarian": ["Hungary"], "Thai": ["Thailand"], "Vietnamese": ["Vietnam"],
        },
    ),
    "city_country": (
        "The city of {} is located in the country of",
        ["{} is a city in", "If you travel to {}, you will be in the country of"],
        {
            "France": ["Paris", "Lyon", "Marseille", "Nice", "Bordeaux", "Toulouse"],
            "Germany": ["Berlin", "Munich", "Hamburg", "Frankfurt", "Cologne", "Stuttgart"],
            "Italy": ["Rome", "Milan", "Naples", "Florence", "Venice", "Turin"],
            "Spain": ["Madrid", "Barcelona", "Seville", "Valencia", "Bilbao"],
            "Japan": ["Tokyo", "Osaka", "Kyoto", "Hiroshima", "Nagoya"],
            "China": ["Beijing", "Shanghai", "Shenzhen", "Guangzhou", "Wuhan"],
            "India": ["Delhi", "Mumbai", "Bangalore", "Chennai", "Kolkata"],
            "Brazil": ["Rio de Janeiro", "Sao Paulo", "Brasilia", "Salvador"],
            "Canada": ["Toronto", "Montreal", "Vancouver", "Ottawa", "Calgary"],
            "Australia": ["Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide"],
            "Russia": ["Moscow", "Saint Petersburg", "Novosibirsk", "Kazan"],
            "Egypt": ["Cairo", "Alexandria", "Luxor"],
        },
    ),
    "native_language": (
        "The mother tongue of {} is",
        ["{} grew up speaking", "The first language of {} is"],
        {
            "French": ["Emmanuel Macron", "Victor Hugo", "Edith Piaf", "Claude Monet", "Napoleon Bonaparte", "Jacques Chirac"],
            "German": ["Angela Merkel", "Johann Sebastian Bach", "Albert Einstein", "Ludwig van Beethoven", "Martin Luther", "Karl Marx"],
            "Russian": ["Vladimir Putin", "Leo Tolstoy", "Fyodor Dostoevsky", "Yuri Gagarin", "Anton Chekhov"],
            "Italian": ["Leonardo da Vinci", "Galileo Galilei", "Dante Alighieri", "Giuseppe Verdi", "Luciano Pavarotti"],
            "Spanish": ["Pablo Picasso", "Miguel de Cervantes", "Gabriel Garcia Marquez", "Salvador Dali", "Frida Kahlo"],
            "English": ["William Shakespeare", "Charles Dickens", "Winston Churchill", "Abraham Lincoln", "Queen Elizabeth"],
            "Japanese": ["Hayao Miyazaki", "Akira Kurosawa", "Haruki Murakami"],
            "Portuguese": ["Pele", "Cristiano Ronaldo", "Fernando Pessoa"],
            "Chinese": ["Confucius", "Mao Zedong", "Jackie Chan"],
        },
    ),
    "continent": (
        "{} is located in the continent of",
        ["The country of {} is part of the continent of", "{} is a country in"],
        {
            "Africa": ["Nigeria", "Kenya", "Ethiopia", "Ghana", "Morocco", "Algeria", "Tunisia", "Uganda", "Tanzania", "Zambia", "Zimbabwe", "Cameroon", "Namibia", "Botswana", "Rwanda", "Madagascar"],
            "Asia": ["Japan", "China", "India", "Thailand", "Vietnam", "Indonesia", "Pakistan", "Bangladesh", "Nepal", "Mongolia", "Malaysia", "Philippines", "Cambodia", "Kazakhstan"],
            "Europe": ["France", "Germany", "Italy", "Spain", "Portugal", "Norway", "Sweden", "Poland", "Austria", "Greece", "Ireland", "Belgium", "Denmark", "Switzerland", "Romania", "Croatia"],
            "South America": ["Brazil", "Argentina", "Chile", "Peru", "Colombia", "Venezuela", "Ecuador", "Bolivia", "Paraguay", "Uruguay"],
        },
    ),
    "company_country": (
        "The company {} was founded in the country of",
        ["{} is a company from", "The home country of the company {} is"],
        {
            "Japan": ["Toyota", "Sony", "Honda", "Nintendo", "Panasonic", "Canon", "Mitsubishi"],
            "Germany": ["BMW", "Volkswagen", "Siemens", "Adidas", "Mercedes-Benz", "Bosch"],
            "the United States": ["Apple", "Microsoft", "Google", "Amazon", "Coca-Cola", "Boeing", "Ford"],
            "South Korea": ["Samsung", "Hyundai", "LG", "Kia"],
            "Italy": ["Ferrari", "Fiat", "Lamborghini", "Gucci", "Prada"],
            "France": ["Renault", "Peugeot", "Chanel", "Michelin", "Danone"],
            "Sweden": ["IKEA", "Volvo", "Spotify", "Ericsson"],
        },
    ),
}
NEIGHBOURS = 5  # neighbourhood prompts per request (fewer when the answer has fewer other subjects)


def build_requests(seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for relation, (prompt, paraphrases, by_answer) in RELATIONS.items():
        answers = sorted(by_answer)
        for answer in answers:
            for subject in by_answer[answer]:
                new = rng.choice([a for a in answers if a != answer])
                others = [s for s in by_answer[answer] if s != subject]
                neighbours = rng.sample(others, min(NEIGHBOURS, len(others)))
                records.append({
                    "case_id": len(records),
                    "relation": relation,
                    "requested_rewrite": {"prompt": prompt, "subject": subject, "target_new": {"str": new}, "target_true": {"str": answer}},
                    "paraphrase_prompts": [p.replace("{}", subject) for p in paraphrases],
                    "neighborhood_prompts": [prompt.replace("{}", s) for s in neighbours],
                    "generation_prompts": [f"{subject} is", f"Here is a short fact about {subject}:"],
                })
    return records


def mark_known(records: list[dict]) -> None:
    from hydra import compose, initialize_config_dir

    from cl_runner.editing.metrics import teacher_forced
    from cl_runner.models import load_model

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        model, tokenizer = load_model(compose("config").model)
    prompts = [r["requested_rewrite"]["prompt"].replace("{}", r["requested_rewrite"]["subject"]) for r in records]
    true = teacher_forced(model, tokenizer, prompts, [r["requested_rewrite"]["target_true"]["str"] for r in records])
    new = teacher_forced(model, tokenizer, prompts, [r["requested_rewrite"]["target_new"]["str"] for r in records])
    for record, (nll_true, _), (nll_new, _) in zip(records, true, new):
        record["base_prefers_true"] = nll_true < nll_new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--mark-known", action="store_true", help="score the rewrite prompts with SmolLM2 and flag the facts it knows")
    args = parser.parse_args()
    records = build_requests(args.seed)
    if args.mark_known:
        mark_known(records)
    args.out.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
    known = sum(r.get("base_prefers_true", False) for r in records)
    print(f"{args.out}: {len(records)} requests" + (f", {known} known to the base model" if args.mark_known else ""))


if __name__ == "__main__":
    main()
