"""Generated test data with the properties the mechanism tests need, so a fresh clone runs them without ../shared.

- `word_problems`: GSM8K-like qa rows — a multi-sentence question, a worked answer with one calculation per line
  and a final "#### n" line; lengths spread about like GSM8K's (at 4 characters per token: median ~90, 90th
  percentile ~195, 6 % over 220; GSM8K: 121, 202, 6 %). Every row draws its own names, objects, numbers and sentence templates, so no
  two rows are near duplicates (shingle Jaccard < 0.8), neither in full nor by question alone: the tests plant
  exactly the duplicates they look for (tests/test_dedup.py checks this by brute force).
- `quiz`: ARC-like multiple-choice science questions (another topic for the clustering tests), and hand-written
  multiple-choice pairs that are, or are not, the same question for the embedding dedup.
- `documents`: C4-like raw-text documents (no prompt), many longer than a sequence; `skills_documents`: the built-in
  `skills` rows as raw text (learnable in a few steps, packed into full sequences).
Deterministic for a seed; pure Python.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = [("Ava", "she"), ("Liam", "he"), ("Noor", "she"), ("Mateo", "he"), ("Priya", "she"), ("Kofi", "he"),
         ("Hana", "she"), ("Oskar", "he"), ("Lucia", "she"), ("Ravi", "he"), ("Chloe", "she"), ("Tariq", "he"),
         ("Ingrid", "she"), ("Diego", "he"), ("Amara", "she"), ("Yusuf", "he"), ("Mei", "she"), ("Bruno", "he"),
         ("Sofia", "she"), ("Kenji", "he"), ("Zara", "she"), ("Felix", "he"), ("Leila", "she"), ("Omar", "he"),
         ("Greta", "she"), ("Jonah", "he"), ("Anika", "she"), ("Pablo", "he"), ("Elif", "she"), ("Malik", "he"),
         ("Rosa", "she"), ("Tomas", "he"), ("Dalia", "she"), ("Viktor", "he"), ("Imani", "she"), ("Arjun", "he")]
THINGS = ["apples", "marbles", "stickers", "books", "cookies", "pencils", "seashells", "stamps", "cupcakes",
          "tulips", "bottle caps", "postcards", "crayons", "buttons", "comic books", "baseball cards", "pebbles",
          "ribbons", "candles", "muffins", "bracelets", "puzzles", "lemons", "balloons", "toy cars", "notebooks",
          "keychains", "jars of jam", "rolls of tape", "paper cranes", "model planes", "feathers", "acorns",
          "bananas", "socks", "dice", "magnets", "glass beads", "chess sets", "kites"]
PLACES = ["the market", "a yard sale", "the school fair", "the library sale", "the corner shop", "the beach",
          "the county fair", "a flea market", "the bakery", "the museum shop", "the harbor", "the park",
          "the garden center", "a toy store", "the train station", "the craft show"]
WHEN = ["On Monday", "On Tuesday", "On Wednesday", "On Thursday", "On Friday", "On Saturday", "On Sunday",
        "In the morning", "After lunch", "In the evening", "Last week", "The next day", "Later that day",
        "Before dinner", "At noon", "During the holidays", "Over the weekend", "Early in spring"]
FILLER = ["The weather was unusually warm.", "It had rained all night.", "The line at the counter was long.",
          "A neighbor came along to help.", "Everything was written down in a small notebook.",
          "Nobody else in the family was home.", "The bus was twenty minutes late.", "A radio played old songs.",
          "The shop had just opened its doors.", "Music drifted over from a nearby street.",
          "Snow was falling softly outside.", "The count was checked twice to be sure."]
_OBJ = {"she": "her", "he": "him"}
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "striped", "tiny", "large", "wooden",
          "shiny", "old", "new", "handmade", "spotted"]


def _start(rng, name, pro, thing):
    x = rng.randint(12, 95)
    color = rng.choice(COLORS)
    q = rng.choice([f"{name} has {x} {color} {thing}.",
                    f"{name} collected {x} {color} {thing} at {rng.choice(PLACES)}.",
                    f"At {rng.choice(PLACES)}, {name} bought {x} {color} {thing}.",
                    f"{name} keeps {x} {color} {thing} in a box under the bed.",
                    f"{name} started the month with {x} {color} {thing}."])
    return x, q, f"{name} starts with {x} {thing}."


def _step(rng, x, name, pro, thing):
    """One operation on the running count x -> (new x, question sentence, answer line)."""
    friend = rng.choice(NAMES)[0]
    when = rng.choice(WHEN)
    later = when[0].lower() + when[1:]  # mid-sentence
    op = rng.choice(["add", "sub", "mul", "div", "add", "sub"])
    if op == "div" and x % 2 and x % 3:
        op = "add"
    if op == "sub" and x < 4:
        op = "add"
    if op == "add":
        b = rng.randint(3, 60)
        y = x + b
        q = rng.choice([f"{when}, {friend} gives {_OBJ[pro]} {b} more.",
                        f"{when}, {pro} finds {b} more at {rng.choice(PLACES)}.",
                        f"{when}, {pro} buys another {b} from {friend}.", f"{friend} adds {b} to the pile {later}."])
        a = f"After getting {b} more, {name} has {x} + {b} = <<{x}+{b}={y}>>{y} {thing}."
    elif op == "sub":
        b = rng.randint(1, x - 1)
        y = x - b
        q = rng.choice([f"{when}, {pro} gives {b} to {friend}.",
                        f"{when}, {pro} loses {b} on the way to {rng.choice(PLACES)}.",
                        f"{friend} borrows {b} of them {later}.", f"{when}, {pro} sells {b} at {rng.choice(PLACES)}."])
        a = f"Giving away {b} leaves {x} - {b} = <<{x}-{b}={y}>>{y} {thing}."
    elif op == "mul":
        k = rng.randint(2, 4)
        y = x * k
        word = {2: "doubles", 3: "triples", 4: "quadruples"}[k]
        q = rng.choice([f"{when}, {pro} {word} the collection.",
                        f"{when}, {friend} helps {name} make it {k} times as many.",
                        f"Then the number of {thing} {word} {later}."])
        a = f"Multiplying by {k} gives {x} * {k} = <<{x}*{k}={y}>>{y} {thing}."
    else:
        k = 2 if x % 2 == 0 else 3
        y = x // k
        q = rng.choice([f"{when}, {pro} splits them into {k} equal groups and keeps one group.",
                        f"{when}, {pro} keeps only one of every {k} and gives the rest to {friend}."])
        a = f"Keeping one part in {k} leaves {x} / {k} = <<{x}/{k}={y}>>{y} {thing}."
    if y > 5000:  # keep numbers GSM8K-sized
        return _step(rng, x, name, pro, thing)
    return y, q, a


def word_problem(rng: random.Random) -> dict:
    name, pro = rng.choice(NAMES)
    thing = rng.choice(THINGS)
    x, q0, a0 = _start(rng, name, pro, thing)
    k = min(12, 1 + int(rng.expovariate(1 / 2.2)))  # steps: median ~2, a tail of long problems
    qs, ans = [q0], [a0]
    for _ in range(k):
        x, q, a = _step(rng, x, name, pro, thing)
        qs.append(q)
        ans.append(a)
        if rng.random() < 0.2:
            qs.append(rng.choice(FILLER))
    ask = rng.choice([f"How many {thing} does {name} have now?", f"How many {thing} does {name} end up with?",
                      f"At the end, how many {thing} are left with {name}?"])
    return {"question": " ".join(qs + [ask]), "answer": "\n".join(ans + [f"#### {x}"])}


def word_problems(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [word_problem(rng) for _ in range(n)]


# A hand-written pair: the same question asked with another name, solved in other words (as GSM8K's rows 2483 and
# 6691 are); and a variant with an extra clause and another answer, which is not the same question.
_TOMATOES = ("{n} grows tomatoes in a small garden behind the house. She picks 14 tomatoes on Monday and twice as many "
             "on Tuesday. Then 9 of them go to a neighbor and the rest are sold at the market for $2 each. How much "
             "money does {n} make?")
REPEATED_QUESTION = (
    (_TOMATOES.format(n="Josie"),
     "On Tuesday Josie picks 14 * 2 = <<14*2=28>>28 tomatoes.\nIn total she has 14 + 28 = <<14+28=42>>42 tomatoes.\n"
     "After giving 9 away she sells 42 - 9 = <<42-9=33>>33 tomatoes.\nShe makes 33 * 2 = $<<33*2=66>>66.\n#### 66"),
    (_TOMATOES.format(n="Amanda"),
     "Amanda picked 2 x 14 = 28 on the second day, so 28 + 14 = 42 altogether.\nShe kept 42 - 9 = 33 to sell.\n"
     "Selling them brings in 2 x 33 = $66.\n#### 66"))
VARIANT_QUESTION = (
    "Josie grows tomatoes in a small garden behind the house. She picks 14 tomatoes on Monday and three times as many "
    "on Tuesday, but a storm on Wednesday ruins 6 of them before she can store them. Then 9 of them go to a neighbor "
    "and the rest are sold at the market for $2 each. How much money does Josie make?",
    "On Tuesday she picks 14 * 3 = <<14*3=42>>42 tomatoes, so 14 + 42 = <<14+42=56>>56 in all.\nThe storm leaves "
    "56 - 6 = <<56-6=50>>50.\nShe sells 50 - 9 = <<50-9=41>>41 tomatoes for 41 * 2 = $<<41*2=82>>82.\n#### 82")

_KINDS = {"mammal": ["a whale", "a bat", "a horse", "a dolphin", "a mouse", "an elephant", "a goat", "a seal"],
          "metal": ["copper", "iron", "aluminum", "silver", "tin", "zinc", "nickel", "lead"],
          "planet": ["Mercury", "Venus", "Mars", "Jupiter", "Saturn", "Neptune", "Uranus", "Earth"],
          "gas at room temperature": ["oxygen", "helium", "nitrogen", "neon", "carbon dioxide", "argon", "hydrogen"],
          "insect": ["an ant", "a beetle", "a moth", "a wasp", "a cricket", "a ladybug", "a grasshopper"],
          "bird": ["a sparrow", "an owl", "a penguin", "a robin", "a hawk", "a parrot", "a crow"],
          "fish": ["a trout", "a salmon", "a shark", "a tuna", "a cod", "a goldfish", "a perch"],
          "reptile": ["a lizard", "a turtle", "a snake", "a gecko", "a crocodile", "an iguana"],
          "measuring tool": ["a thermometer", "a ruler", "a balance", "a stopwatch", "a rain gauge", "a barometer"],
          "renewable energy source": ["sunlight", "wind", "flowing water", "geothermal heat", "tides"],
          "igneous rock": ["basalt", "granite", "obsidian", "pumice"],
          "simple machine": ["a lever", "a pulley", "a ramp", "a wedge", "a screw", "a wheel and axle"]}
_ASK = ["Which of these is {a} {k}?", "Which one of the following is an example of {a} {k}?",
        "A student sorts a list into groups. Which item belongs with the {k}s?",
        "Which choice below names {a} {k}?", "Ms. {t} asks the class to pick {a} {k}. Which is correct?"]
_SETTING = ["A class is studying {t}.", "A student reads about {t} in a library book.",
            "During a field trip the group learns about {t}.", "A teacher shows a short film about {t}.",
            "Two friends argue about {t} after school.", "A science fair poster explains {t}.",
            "A park ranger gives a talk on {t}.", "A worksheet asks several questions about {t}.", ""]
_TOPICS = ["energy", "electric circuits", "the human body", "matter", "the solar system", "animal groups",
           "weather instruments", "forces and motion", "plant life", "the air we breathe", "the water cycle",
           "volcanoes", "ecosystems", "magnets", "fossils", "sound waves", "simple machines", "erosion"]


def quiz(n: int, seed: int = 0) -> list[dict]:
    """ARC-like rows {"question", "choices", "gold"}: pick the member of a kind among three from other kinds."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind, *others = rng.sample(sorted(_KINDS), 4)
        choices = [rng.choice(_KINDS[kind])] + [rng.choice(_KINDS[o]) for o in others]
        order = rng.sample(range(4), 4)
        article = "an" if kind[0] in "aeiou" else "a"
        ask = rng.choice(_ASK).format(a=article, k=kind, t=rng.choice(NAMES)[0])
        setting = rng.choice(_SETTING).format(t=rng.choice(_TOPICS))
        out.append({"question": f"{setting} Question: {ask}".strip(), "choices": [choices[i] for i in order],
                    "gold": order.index(0)})
    return out


def quiz_record(r: dict) -> dict:
    """A quiz row as a selection record: the question and its choices, answered by the right choice."""
    return {"prompt": r["question"] + "\n" + "\n".join(r["choices"]), "response": r["choices"][r["gold"]]}


# Hand-written multiple-choice records for the embedding dedup: five pairs that differ by a typo-level edit (a
# misspelling, a word added, a plural), as ARC-Easy's duplicates do; and three pairs that are different questions: a
# long shared passage with two other questions (only the tail tells them apart), the same question with other
# choices, and an opposite question.
_PASSAGE = ("Use the information below to answer the question. A pond near a school slowly filled with mud over forty "
            "years. Students measured its depth every spring and counted the frogs, dragonflies and reeds along the "
            "shore. As the water became shallower, the reeds spread toward the middle and fewer frogs were counted. ")


def _mc(question: str, choices: list[str], gold: int) -> dict:
    return {"prompt": "Question: " + question + "\n" + "\n".join(choices), "response": choices[gold]}


_FEATHER = "A student drops a {f} and a hammer on the Moon at the same time. Which lands first?"
_BOIL = ("Mia pours 300 milliliters of water into a pot and heats it until it boils at 100°C. She repeats this with "
         "600 milliliters. At what temperature does {w} larger amount boil?")
_CELLS = "Which statement about plant and {a} cells is true?"
_OWLS = "A forest was cleared to build a parking lot. Three years later no owls lived there. Why did the owls leave?"
_LIGHT = ("{y} 1905, a scientist showed that light can behave like a stream of particles. Which observation supports "
          "this idea?")
_LIGHT_CHOICES = ["Light bends in water.", "Light knocks electrons out of metal.", "Light forms rainbows.",
                  "Light travels fast."]
SEMANTIC_SAME = [
    (_mc(_FEATHER.format(f="feather"), ["the hammer", "the feather", "both land together", "neither falls"], 2),
     _mc(_FEATHER.format(f="fether"), ["the hammer", "the feather", "both land together", "neither falls"], 2)),
    (_mc(_BOIL.format(w="the"), ["half as high", "twice as high", "the same", "slightly lower"], 2),
     _mc(_BOIL.format(w="this"), ["half as high", "twice as high", "the same", "slightly lower"], 2)),
    (_mc(_CELLS.format(a="animal"), ["Both have a cell wall.", "Both have chloroplasts.", "Both have a nucleus.",
                                     "Both make their own food."], 2),
     _mc(_CELLS.format(a="animals"), ["Both have a cell wall.", "Both have chloroplasts.", "Both have a nucleus.",
                                      "Both make their own food."], 2)),
    (_mc(_OWLS, ["The owls were too cold.", "The owls lost the trees they nested in.", "The owls moved to the sea.",
                 "The owls stopped eating."], 1),
     _mc(_OWLS, ["The owls were too cold.", "The owls lost the tree they nested in.", "The owls moved to the sea.",
                 "The owls stopped eating."], 1)),
    (_mc(_LIGHT.format(y="In"), _LIGHT_CHOICES, 1), _mc(_LIGHT.format(y="n"), _LIGHT_CHOICES, 1)),
]
SEMANTIC_DIFFERENT = [
    (_mc(_PASSAGE + "Which change in the pond most likely caused fewer frogs to be counted?",
         ["more reeds", "less open water", "warmer springs", "more students"], 1),
     _mc(_PASSAGE + "Which tool would the students use to measure the depth of the pond each spring?",
         ["a thermometer", "a measuring stick", "a balance", "a magnet"], 1)),
    (_mc("What keeps the Moon in orbit around the Earth?", ["air resistance", "friction", "gravity", "magnetism"], 2),
     _mc("What keeps the Moon in orbit around the Earth?", ["tides", "gravity", "electricity", "sunlight"], 1)),
    (_mc("Which planet is closest to the Sun?", ["Mercury", "Venus", "Earth", "Mars"], 0),
     _mc("Which planet is farthest from the Sun?", ["Mercury", "Saturn", "Neptune", "Mars"], 2)),
]


_VOCAB = ("time year people way day man thing woman life child world school state family student group country "
          "problem hand part place case week company system program question work government number night point "
          "home water room mother area money story fact month lot right study book eye job word business issue "
          "side kind head house service friend father power hour game line end member law car city community name "
          "president team minute idea kid body information back parent face others level office door health person "
          "art war history party result change morning reason research girl guy moment air teacher force education "
          "river garden market village bridge harbor train letter window kitchen island winter summer music "
          "paint engine farmer doctor street forest mountain storm evening").split()
_VERBS = "is was makes takes sees finds gives tells feels becomes leaves puts means keeps begins seems helps shows " \
         "hears plays runs moves lives believes brings writes sits stands loses pays meets includes continues sets " \
         "learns changes leads understands watches follows stops creates speaks reads spends grows opens walks".split()


def document(rng: random.Random, n_words: int) -> str:
    words, sentences = 0, []
    while words < n_words:
        k = rng.randint(6, 18)
        s = [rng.choice(_VOCAB) if i % 3 else rng.choice(_VERBS) for i in range(k)]
        s[0] = s[0].capitalize()
        sentences.append(" ".join(s) + rng.choice([".", ".", ".", "!", "?"]))
        words += k
        if rng.random() < 0.15:
            sentences[-1] += "\n\n"
    return " ".join(sentences).replace("\n\n ", "\n\n").strip()


def documents(n: int, seed: int = 0) -> list[dict]:
    """{"text"} rows of 60-2400 words (~80-3200 tokens at 4 chars/token): many longer than a sequence."""
    rng = random.Random(seed)
    return [{"text": document(rng, int(60 * 40 ** rng.random()))} for _ in range(n)]


def skills_documents(n: int, seed: int = 0, per_document: int = 30) -> list[dict]:
    """{"text"} rows of `per_document` lines "question answer" from the built-in `skills` generator: raw text that
    a tiny model learns fast (its templates repeat), packed into full sequences."""
    from unitrain.data.demo import generate

    rows = generate("skills", n * per_document, seed=seed)
    return [{"text": "\n".join(f"{r['question']} {r['answer']}" for r in rows[k:k + per_document])}
            for k in range(0, len(rows), per_document)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
