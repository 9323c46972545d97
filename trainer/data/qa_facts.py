"""The embedded QA data set: short biographies of invented people, written as SQuAD v2.0 JSON files.

Each paragraph states a few facts about one person and one relative, so a question has same-typed
distractors in its context (two birth years, two jobs, several places) and must be read, not pattern-
matched. Every fact has several question phrasings; a fact left out of the paragraph becomes an
unanswerable question (SQuAD v2). Names are invented, so the pretrained encoder cannot know the answers.
Validation paragraphs use their own seed, hence unseen people, and some questions carry a second, shorter
gold answer (as SQuAD's validation set does).
"""

import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.files import write_json_atomic

FIRST = [
    "Ada",
    "Bruno",
    "Clara",
    "Dmitri",
    "Elena",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Luca",
    "Mara",
    "Nils",
    "Olga",
    "Pavel",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wim",
    "Yara",
    "Zeno",
]
SYLLABLES = [
    "bar",
    "cen",
    "dor",
    "fel",
    "gan",
    "hol",
    "kir",
    "lan",
    "mor",
    "nes",
    "pol",
    "ral",
    "sen",
    "tov",
    "vel",
    "wen",
    "zar",
    "bri",
    "cas",
    "mel",
]
CITIES = [
    "Lisbon",
    "Krakow",
    "Tallinn",
    "Porto",
    "Ghent",
    "Bergen",
    "Graz",
    "Turku",
    "Bilbao",
    "Leeds",
    "Lyon",
    "Split",
    "Brno",
    "Aarhus",
    "Cork",
    "Utrecht",
    "Malmo",
    "Bologna",
    "Dresden",
    "Riga",
    "Zagreb",
    "Basel",
]
JOBS = [
    "carpenter",
    "chemist",
    "violinist",
    "surveyor",
    "librarian",
    "glassblower",
    "engineer",
    "botanist",
    "cartographer",
    "watchmaker",
    "physician",
    "printer",
    "architect",
    "baker",
    "astronomer",
    "weaver",
]
SUBJECTS = [
    "mathematics",
    "geology",
    "medieval history",
    "organic chemistry",
    "botany",
    "naval architecture",
    "philosophy",
    "astronomy",
    "economics",
    "classical music",
    "civil engineering",
    "linguistics",
]
ORG_WORDS = [
    ("Northern", "Foundry"),
    ("Royal", "Observatory"),
    ("Harbour", "Press"),
    ("Central", "Railway"),
    ("Silver", "Mills"),
    ("Coastal", "Survey"),
    ("Eastern", "Bank"),
    ("Grand", "Theatre"),
]
RELATIONS = ["brother", "sister", "cousin", "daughter", "son", "uncle"]


def invented_surname(rng: random.Random) -> str:
    return "".join(rng.sample(SYLLABLES, rng.choice([2, 3]))).capitalize()


@dataclass
class Paragraph:
    """A context built sentence by sentence, remembering where each answer starts."""

    text: str = ""
    spans: dict[str, tuple[str, int]] = field(default_factory=dict)

    def add(self, template: str, **answers: str) -> None:
        """Appends a sentence; `{key}` slots are answers whose character offsets are recorded."""
        for literal, key, _, _ in string.Formatter().parse(template):
            self.text += literal
            if key is not None:
                self.spans[key] = (answers[key], len(self.text))
                self.text += answers[key]
        self.text += " "


Question = tuple[list[str], str, list[str]]  # phrasings, answer key ("" = unanswerable), extra gold answers


def biography(rng: random.Random) -> tuple[Paragraph, list[Question]]:
    """One paragraph and a question for every fact a biography can have."""
    name = f"{rng.choice(FIRST)} {invented_surname(rng)}"
    relative = f"{rng.choice(FIRST)} {invented_surname(rng)}"
    relation = rng.choice(RELATIONS)
    born = rng.randint(1820, 1950)
    moved, award_year = born + rng.randint(20, 40), born + rng.randint(25, 60)
    adjective, noun = rng.choice(ORG_WORDS)
    org = f"the {adjective} {noun}"
    cities = rng.sample(CITIES, 4)
    job, relative_job = rng.sample(JOBS, 2)
    award = f"{invented_surname(rng)} Medal"
    first = name.split()[0]

    p = Paragraph()
    p.add("{name} was born in {birth_city} in {born}.", name=name, birth_city=cities[0], born=str(born))
    facts = {  # optional facts: each is in the paragraph or becomes an unanswerable question
        "study": lambda: p.add(
            f"{first} studied {{subject}} at {{university}}.",
            subject=rng.choice(SUBJECTS),
            university=f"the University of {cities[1]}",
        ),
        "work": lambda: p.add(f"Later {first} worked as a {{job}} for {{org}}.", job=job, org=org),
        "relative": lambda: p.add(
            f"{first}'s {relation}, {{relative}}, was a {{relative_job}} born in {{relative_born}}.",
            relative=relative,
            relative_job=relative_job,
            relative_born=str(born + rng.choice([-1, 1]) * rng.randint(2, 12)),
        ),
        "move": lambda: p.add(f"In {moved} the family moved to {{new_city}}.", new_city=cities[2]),
        "award": lambda: p.add(
            f"In {{award_year}} {first} received the {{award}}.", award_year=str(award_year), award=award
        ),
    }
    present = set(rng.sample(sorted(facts), rng.randint(3, 5)))
    for key in facts:  # fixed order, so sentences read naturally
        if key in present:
            facts[key]()

    questions = {
        "birth_city": [f"Where was {name} born?", f"In which city was {first} born?"],
        "born": [f"When was {name} born?", f"In what year was {first} born?"],
        "subject": [f"What did {name} study?", f"Which subject did {first} study?"],
        "university": [f"Where did {name} study?", f"Which university did {first} attend?"],
        "job": [f"What was {name}'s job?", f"What did {first} work as?"],
        "org": [f"Who employed {name}?", f"For which company did {first} work?"],
        "relative": [f"Who was {name}'s {relation}?", f"What was the name of {first}'s {relation}?"],
        "relative_job": [f"What was the occupation of {relative}?", f"What did {name}'s {relation} do?"],
        "relative_born": [f"When was {relative} born?", f"In what year was {first}'s {relation} born?"],
        "new_city": [f"Where did {name}'s family move in {moved}?", f"To which city did {first} move?"],
        "award_year": [f"When did {name} receive the {award}?", f"In which year was {first} given a medal?"],
        "award": [f"What award did {name} receive?", f"Which medal was given to {first}?"],
    }
    # A second gold answer where SQuAD's annotators would also accept a shorter span.
    shorter = {"university": ["University of " + cities[1]], "org": [f"{adjective} {noun}"]}
    return p, [
        (asked, key if key in p.spans else "", shorter.get(key, [])) for key, asked in questions.items()
    ]


def squad_split(num_paragraphs: int, seed: int, with_unanswerable: bool = True) -> dict[str, Any]:
    """A SQuAD v2.0 document: `num_paragraphs` biographies, every answerable question, and (v2) one
    unanswerable question per missing fact."""
    rng = random.Random(seed)
    data = []
    for i in range(num_paragraphs):
        paragraph, items = biography(rng)
        context = paragraph.text.strip()
        qas = []
        for j, (phrasings, key, extra) in enumerate(items):
            if not key and not with_unanswerable:
                continue
            answers = []
            if key:
                text, start = paragraph.spans[key]
                answers = [{"text": text, "answer_start": start}]
                answers += [{"text": alt, "answer_start": context.index(alt, start)} for alt in extra]
            qas.append(
                {
                    "id": f"{seed}-{i}-{j}",
                    "question": rng.choice(phrasings),
                    "answers": answers,
                    "is_impossible": not key,
                }
            )
        data.append(
            {"title": context.split(" was born", 1)[0], "paragraphs": [{"context": context, "qas": qas}]}
        )
    return {"version": "v2.0" if with_unanswerable else "1.1", "data": data}


VERSION = 1  # bump when the generator changes: cached files are keyed by it


def write_facts_dataset(
    cache: Path, train_paragraphs: int, val_paragraphs: int, seed: int
) -> dict[str, Path]:
    """Writes train.json and validation.json under `cache` once; returns their paths."""
    folder = cache / f"qa-facts-v{VERSION}-{train_paragraphs}-{val_paragraphs}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"train": folder / "train.json", "validation": folder / "validation.json"}
    for split, n, split_seed in (("train", train_paragraphs, seed), ("validation", val_paragraphs, seed + 1)):
        if not paths[split].is_file():
            write_json_atomic(paths[split], squad_split(n, split_seed))
    return paths
