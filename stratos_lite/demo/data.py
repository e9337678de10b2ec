"""The embedded demo: synthetic profiles x articles with a learnable relevance rule, and a tokenizer.

The 30 profiles are those of the report's section 6.2, each with a field, a country and interests. An
article has a sector, a topic and a country. Ground truth, the rule a small model can learn:

    reader's field is the article's sector +4.5, topic among the reader's interests +3, same country +2.5

so most pairs score 0 (noise) and few reach 8+ (critical), like the report's data. The reasoning copies one
value of the article and then gives its verdict (`Article sector energy matches.`), three times, and ends
with the rule's total, written as the answer writes a score (`Total 7.5.`); the profile writes its values
in its own form (field and interests capitalised, country as a code), so a verdict is one attention lookup
from the value just written into the profile: learnable by a small model in minutes on a CPU. Every
article is scored for several profiles; train and eval articles are disjoint. Deterministic from a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..data.task import score_text, scoring_completion, scoring_messages
from ..model.tokenizer import Tokenizer, render_prompt, train_chatml_tokenizer
from ..storage.atomic import write_text

COUNTRY_CODES = {
    "Kuwait": "KW", "Qatar": "QA", "UAE": "AE", "Saudi Arabia": "SA", "Bahrain": "BH", "Austria": "AT",
    "UK": "GB", "Portugal": "PT", "Norway": "NO", "France": "FR", "Germany": "DE", "USA": "US", "Canada": "CA",
    "Chile": "CL", "Brazil": "BR", "Mexico": "MX", "India": "IN", "Japan": "JP", "South Korea": "KR",
    "Nigeria": "NG", "Australia": "AU",
}

TOPICS = {
    "energy": ["oil", "refining", "hydrogen", "seismic"],
    "computing": ["ai", "chips", "cybersecurity", "cloud"],
    "finance": ["banking", "fintech", "markets", "payments"],
    "medicine": ["oncology", "emergencies", "trials", "pharmacy"],
    "law": ["mergers", "regulation", "courts"],
    "construction": ["cities", "megaprojects", "housing"],
    "media": ["documentary", "festivals", "streaming"],
    "trades": ["hvac", "welding", "pipelines", "contractors"],
    "marine": ["wind", "shipyards", "cables"],
    "education": ["universities", "admissions", "campus"],
    "food": ["restaurants", "chefs", "hygiene"],
    "agriculture": ["soy", "coffee", "harvests"],
    "gaming": ["indie", "engines", "gamescom"],
    "diplomacy": ["un", "nuclear", "sanctions"],
    "sports": ["rugby", "injuries", "athletics"],
    "mining": ["copper", "lithium", "safety"],
    "marketing": ["idols", "advertising", "influencers"],
    "arts": ["bonsai", "galleries", "crafts"],
    "science": ["genomics", "biotech", "labs"],
    "logistics": ["shipping", "ports", "freight"],
}


@dataclass(frozen=True)
class Profile:
    id: str
    title: str
    country: str
    field: str
    interests: tuple[str, ...]

    def text(self) -> str:
        interests = ", ".join(i.capitalize() for i in self.interests)
        code = COUNTRY_CODES[self.country]
        return f"{self.title}. Field: {self.field.capitalize()}. Country: {code}. Interests: {interests}."


PROFILES = [Profile(*row[:4], tuple(row[4])) for row in [
    ("cs-student-auk", "Computer Engineering student, AUK Kuwait", "Kuwait", "computing", ["ai", "chips"]),
    ("architect-doha", "Architect, smart city projects, Doha", "Qatar", "construction", ["cities"]),
    ("data-scientist-dubai", "Data Scientist, Dubai fintech", "UAE", "finance", ["fintech", "markets"]),
    ("sophomore-uchicago", "Undeclared sophomore, UChicago", "USA", "education", ["campus", "admissions"]),
    ("geophysicist-koc", "Senior geophysicist, KOC Kuwait", "Kuwait", "energy", ["seismic", "oil"]),
    ("cyber-analyst-kuwait", "Cybersecurity analyst, Kuwaiti bank", "Kuwait", "computing", ["cybersecurity"]),
    ("finance-student-gust", "Finance & Accounting student, GUST Kuwait", "Kuwait", "finance", ["banking"]),
    ("mining-engineer-santiago", "Mining engineer, Santiago Chile", "Chile", "mining", ["copper", "lithium"]),
    ("filmmaker-mumbai", "Independent documentary filmmaker, Mumbai", "India", "media", ["documentary"]),
    ("hvac-houston", "HVAC tech & business owner, Houston", "USA", "trades", ["hvac", "contractors"]),
    ("welder-edmonton", "Pipeline welder & CWB inspector, Edmonton", "Canada", "trades", ["welding", "pipelines"]),
    ("mech-grad-neom", "Mechanical Engineering grad, NEOM/Aramco", "Saudi Arabia", "energy", ["hydrogen"]),
    ("ux-designer-tokyo", "UX Designer, consumer electronics, Tokyo", "Japan", "computing", ["ai"]),
    ("petroleum-student-ku", "Petroleum Engineering student, Kuwait University", "Kuwait", "energy",
     ["oil", "refining"]),
    ("cto-lagos", "CTO, mobile payments startup, Lagos", "Nigeria", "finance", ["payments"]),
    ("nurse-toronto", "Emergency dept nurse practitioner, Toronto", "Canada", "medicine", ["emergencies"]),
    ("diplomat-vienna", "Retired UN diplomat, Vienna", "Austria", "diplomacy", ["un", "nuclear"]),
    ("lawyer-london", "Corporate lawyer, London", "UK", "law", ["mergers", "regulation"]),
    ("it-consultant-lisbon", "Retired IT consultant, Lisbon", "Portugal", "computing", ["cloud"]),
    ("supply-chain-manama", "Supply chain analyst, Manama Bahrain", "Bahrain", "logistics", ["shipping", "freight"]),
    ("marine-electrician-stavanger", "Marine electrician, offshore wind, Stavanger", "Norway", "marine", ["wind"]),
    ("pharmacist-paris", "Hospital pharmacist, oncology, Paris", "France", "medicine", ["oncology", "pharmacy"]),
    ("oncologist-kfh", "Pediatric oncologist, King Faisal Hospital", "Saudi Arabia", "medicine",
     ["oncology", "trials"]),
    ("physio-sydney", "Sports physiotherapist, rugby club, Sydney", "Australia", "sports", ["rugby", "injuries"]),
    ("chef-mexico-city", "Executive chef & restaurant owner, Mexico City", "Mexico", "food", ["restaurants"]),
    ("biotech-kaust", "Biotech researcher, KAUST Jeddah", "Saudi Arabia", "science", ["genomics"]),
    ("game-dev-berlin", "Indie game developer, Berlin", "Germany", "gaming", ["indie", "gamescom"]),
    ("commodities-sao-paulo", "Agricultural commodities trader, Sao Paulo", "Brazil", "agriculture",
     ["soy", "coffee"]),
    ("kpop-marketing-seoul", "Digital marketing manager, K-pop agency, Seoul", "South Korea", "marketing",
     ["idols"]),
    ("bonsai-kyoto", "Professional bonsai artist, Kyoto", "Japan", "arts", ["bonsai"]),
]]

TITLES = [  # none starts with the topic: a capitalised topic would look like a reader's interest
    "{country} sees a shift in {topic}",
    "New {topic} report published in {country}",
    "{country}: experts debate the future of {topic}",
    "What the latest {topic} deal means for {country}",
]
FILLERS = [
    "Officials expect more announcements later this year.",
    "Analysts say the change could take months to show.",
    "Local groups welcomed the news with caution.",
    "The move follows a year of steady growth.",
]


@dataclass(frozen=True)
class Article:
    id: str
    field: str
    topic: str
    country: str
    title: str
    text: str


def make_article(index: int, rng: random.Random) -> Article:
    field = rng.choice(list(TOPICS))
    topic = rng.choice(TOPICS[field])
    country = rng.choice(list(COUNTRY_CODES))
    title = rng.choice(TITLES).format(topic=topic, country=country)
    text = f"Sector: {field}. The story covers {topic} in {country}. {rng.choice(FILLERS)}"
    return Article(f"article-{index:05d}", field, topic, country, title[0].upper() + title[1:], text)


def relevance(profile: Profile, article: Article) -> tuple[float, str]:
    """The ground-truth score and the reasoning that explains it."""
    field_match = article.field == profile.field
    topic_match = article.topic in profile.interests
    same_country = article.country == profile.country
    score = 4.5 * field_match + 3.0 * topic_match + 2.5 * same_country
    reasoning = (f"Article sector {article.field} {'matches' if field_match else 'differs'}. "
                 f"Article topic {article.topic} {'listed' if topic_match else 'unlisted'}. "
                 f"Article country {article.country} {'same' if same_country else 'elsewhere'}. "
                 f"Total {score_text(score)}.")
    return score, reasoning


def scored_record(profile: Profile, article: Article) -> dict:
    score, reasoning = relevance(profile, article)
    return {"profile_id": profile.id, "profile": profile.text(), "article_id": article.id,
            "title": article.title, "article": article.text, "score": score, "reasoning": reasoning,
            "sector": article.field, "topic": article.topic, "country": article.country}


def profile_blind(records: list[dict]) -> list[dict]:
    """The same examples scored the way the report's V1 scored: one score per article whoever reads it
    (the mean over its readers, to the half point). The reasoning stays the true one, total included, so
    the base model learns to read the profile and to write every score the rule can reach, but answers
    without regard to what its reasoning found: the fault the demo's adapters fix. (A tiny model trained
    from scratch knows nothing it was not trained on; Qwen3 arrives knowing how to read and count.)"""
    by_article: dict[str, list[float]] = {}
    for r in records:
        by_article.setdefault(r["article_id"], []).append(r["score"])
    return [dict(r, score=round(2 * sum(by_article[r["article_id"]]) / len(by_article[r["article_id"]])) / 2)
            for r in records]


def pick_profiles(article: Article, count: int, rng: random.Random, related_share: float = 0.07) -> list[Profile]:
    """`count` distinct readers: random ones, each swapped with probability `related_share` for one who
    shares the article's field or country, so that the rare high bands exist in useful numbers (the
    real data came skewed the same way)."""
    chosen = rng.sample(PROFILES, count)
    related = [p for p in PROFILES
               if p not in chosen and (p.field == article.field or p.country == article.country)]
    for slot in range(count):
        if related and rng.random() < related_share:
            chosen[slot] = related.pop(rng.randrange(len(related)))
    return chosen


def make_records(articles: int, profiles_per_article: int, seed: int | str, first_index: int = 0,
                 related_share: float = 0.07) -> list[dict]:
    rng = random.Random(seed)  # a str seed is hashed by SHA-512: the same stream on every machine and run
    records = []
    for index in range(first_index, first_index + articles):
        article = make_article(index, rng)
        readers = pick_profiles(article, profiles_per_article, rng, related_share)
        records += [scored_record(p, article) for p in readers]
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def tokenizer_corpus(records: list[dict]) -> list[str]:
    """Each record as the model reads it in training (prompt and completion, ChatML scaffolding included),
    so that the BPE merges fit the text it will encode: role names and the system prompt become a few
    tokens each instead of letters."""
    return [render_prompt(scoring_messages(r["profile"], r["title"], r["article"]))
            + scoring_completion(r["score"], r["reasoning"]) for r in records]


def make_demo_data(out_dir: str | Path, train_articles: int = 600, eval_articles: int = 60,
                   profiles_per_article: int = 5, vocab_size: int = 2048, seed: int = 0,
                   tokenizer: Tokenizer | None = None, base_articles: int | None = None) -> dict[str, Path]:
    """Write train.jsonl, eval.jsonl, base.jsonl (`base_articles` other articles, by default as many as
    train's, with profile-blind labels, for the base phase) and a tokenizer folder under `out_dir`; returns
    their paths. The tokenizer is trained on the base articles and as many of train's, unless one is given
    (the shipped base's: every seed's data is made of the same words)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Each split draws from its own named stream: no seed's eval articles are another seed's training ones
    # (the vendored base was trained on seed 0's base split; every seed's eval must be new to it).
    train = make_records(train_articles, profiles_per_article, f"train-{seed}")
    evaluation = make_records(eval_articles, profiles_per_article, f"eval-{seed}", first_index=train_articles)
    # The base phase reads its own articles, with related readers far more often than the real data has
    # them, so that the few minutes it gets are enough to learn to read a profile.
    base_articles = train_articles if base_articles is None else base_articles
    base = profile_blind(make_records(base_articles, profiles_per_article, f"base-{seed}",
                                      first_index=train_articles + eval_articles, related_share=0.5))
    paths = {"train": out / "train.jsonl", "eval": out / "eval.jsonl", "base": out / "base.jsonl",
             "tokenizer": out / "tokenizer"}
    write_jsonl(train, paths["train"])
    write_jsonl(evaluation, paths["eval"])
    write_jsonl(base, paths["base"])
    corpus = tokenizer_corpus(train[:base_articles * profiles_per_article] + base)  # the base's, whatever train's size
    tokenizer = tokenizer or train_chatml_tokenizer(corpus, vocab_size=vocab_size)
    tokenizer.save_pretrained(paths["tokenizer"])
    return paths
