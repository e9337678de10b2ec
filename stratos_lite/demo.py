"""The embedded demo: synthetic profiles x articles with a learnable relevance rule, and a tokenizer.

The 30 profiles are those of the report's section 6.2, each with a field, a country and interests. An
article has a sector, a topic and a country. Ground truth, the rule a small model can learn:

    field match +4.5, topic among the reader's interests +3, same country +2.5 (same wider region +1)

so most pairs score 0 (noise) and few reach 8+ (critical), like the report's data. Every article is
scored for several profiles; train and eval articles are disjoint. Deterministic from a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .tokenizer import Tokenizer, train_chatml_tokenizer

REGIONS = {
    "Gulf": ["Kuwait", "Qatar", "UAE", "Saudi Arabia", "Bahrain"],
    "Europe": ["Austria", "UK", "Portugal", "Norway", "France", "Germany"],
    "Americas": ["USA", "Canada", "Chile", "Brazil", "Mexico"],
    "Asia": ["India", "Japan", "South Korea"],
    "Africa": ["Nigeria"],
    "Oceania": ["Australia"],
}
WIDER_REGION = {country: region for region, countries in REGIONS.items() for country in countries}

TOPICS = {
    "energy": ["oil", "refining", "hydrogen", "seismic surveys"],
    "computing": ["AI", "chips", "cybersecurity", "cloud"],
    "finance": ["banking", "fintech", "markets", "mobile payments"],
    "medicine": ["oncology", "emergency care", "clinical trials", "drug pricing"],
    "law": ["mergers", "regulation", "court rulings"],
    "construction": ["smart cities", "megaprojects", "housing"],
    "media": ["documentary", "film festivals", "streaming"],
    "trades": ["HVAC", "welding", "pipelines", "small business"],
    "marine": ["offshore wind", "shipyards", "subsea cables"],
    "education": ["universities", "admissions", "student life"],
    "food": ["restaurants", "chefs", "food safety"],
    "agriculture": ["soy", "coffee", "harvests"],
    "gaming": ["indie games", "game engines", "Gamescom"],
    "diplomacy": ["UN", "nuclear talks", "sanctions"],
    "sports": ["rugby", "sports injuries", "athletics"],
    "mining": ["copper", "lithium", "mine safety"],
    "marketing": ["K-pop", "advertising", "influencers"],
    "arts": ["bonsai", "galleries", "crafts"],
    "science": ["genomics", "biotech funding", "lab research"],
    "logistics": ["shipping", "ports", "supply chains"],
}


@dataclass(frozen=True)
class Profile:
    id: str
    title: str
    country: str
    field: str
    interests: tuple[str, ...]

    def text(self) -> str:
        return (f"{self.title}. Field: {self.field}. Country: {self.country}. "
                f"Interests: {', '.join(self.interests)}.")


PROFILES = [Profile(*row[:4], tuple(row[4])) for row in [
    ("cs-student-auk", "Computer Engineering student, AUK Kuwait", "Kuwait", "computing", ["AI", "chips"]),
    ("architect-doha", "Architect, smart city projects, Doha", "Qatar", "construction", ["smart cities"]),
    ("data-scientist-dubai", "Data Scientist, Dubai fintech", "UAE", "finance", ["fintech", "markets"]),
    ("sophomore-uchicago", "Undeclared sophomore, UChicago", "USA", "education", ["student life", "admissions"]),
    ("geophysicist-koc", "Senior geophysicist, KOC Kuwait", "Kuwait", "energy", ["seismic surveys", "oil"]),
    ("cyber-analyst-kuwait", "Cybersecurity analyst, Kuwaiti bank", "Kuwait", "computing", ["cybersecurity"]),
    ("finance-student-gust", "Finance & Accounting student, GUST Kuwait", "Kuwait", "finance", ["banking"]),
    ("mining-engineer-santiago", "Mining engineer, Santiago Chile", "Chile", "mining", ["copper", "lithium"]),
    ("filmmaker-mumbai", "Independent documentary filmmaker, Mumbai", "India", "media", ["documentary"]),
    ("hvac-houston", "HVAC tech & business owner, Houston", "USA", "trades", ["HVAC", "small business"]),
    ("welder-edmonton", "Pipeline welder & CWB inspector, Edmonton", "Canada", "trades", ["welding", "pipelines"]),
    ("mech-grad-neom", "Mechanical Engineering grad, NEOM/Aramco", "Saudi Arabia", "energy", ["hydrogen"]),
    ("ux-designer-tokyo", "UX Designer, consumer electronics, Tokyo", "Japan", "computing", ["AI"]),
    ("petroleum-student-ku", "Petroleum Engineering student, Kuwait University", "Kuwait", "energy",
     ["oil", "refining"]),
    ("cto-lagos", "CTO, mobile payments startup, Lagos", "Nigeria", "finance", ["mobile payments"]),
    ("nurse-toronto", "Emergency dept nurse practitioner, Toronto", "Canada", "medicine", ["emergency care"]),
    ("diplomat-vienna", "Retired UN diplomat, Vienna", "Austria", "diplomacy", ["UN", "nuclear talks"]),
    ("lawyer-london", "Corporate lawyer, London", "UK", "law", ["mergers", "regulation"]),
    ("it-consultant-lisbon", "Retired IT consultant, Lisbon", "Portugal", "computing", ["cloud"]),
    ("supply-chain-manama", "Supply chain analyst, Manama Bahrain", "Bahrain", "logistics",
     ["shipping", "supply chains"]),
    ("marine-electrician-stavanger", "Marine electrician, offshore wind, Stavanger", "Norway", "marine",
     ["offshore wind"]),
    ("pharmacist-paris", "Hospital pharmacist, oncology, Paris", "France", "medicine", ["oncology", "drug pricing"]),
    ("oncologist-kfh", "Pediatric oncologist, King Faisal Hospital", "Saudi Arabia", "medicine",
     ["oncology", "clinical trials"]),
    ("physio-sydney", "Sports physiotherapist, rugby club, Sydney", "Australia", "sports",
     ["rugby", "sports injuries"]),
    ("chef-mexico-city", "Executive chef & restaurant owner, Mexico City", "Mexico", "food", ["restaurants"]),
    ("biotech-kaust", "Biotech researcher, KAUST Jeddah", "Saudi Arabia", "science", ["genomics"]),
    ("game-dev-berlin", "Indie game developer, Berlin", "Germany", "gaming", ["indie games", "Gamescom"]),
    ("commodities-sao-paulo", "Agricultural commodities trader, Sao Paulo", "Brazil", "agriculture",
     ["soy", "coffee"]),
    ("kpop-marketing-seoul", "Digital marketing manager, K-pop agency, Seoul", "South Korea", "marketing",
     ["K-pop"]),
    ("bonsai-kyoto", "Professional bonsai artist, Kyoto", "Japan", "arts", ["bonsai"]),
]]

TITLES = [
    "{topic} news from {country}",
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
    country = rng.choice(list(WIDER_REGION))
    title = rng.choice(TITLES).format(topic=topic, country=country)
    text = (f"Sector: {field}. Country: {country}. The story covers {topic} in {country}. "
            f"{rng.choice(FILLERS)}")
    return Article(f"article-{index:05d}", field, topic, country, title[0].upper() + title[1:], text)


def relevance(profile: Profile, article: Article) -> tuple[float, str]:
    """The ground-truth score and the reasoning that explains it."""
    field_match = article.field == profile.field
    topic_match = article.topic in profile.interests
    same_country = article.country == profile.country
    same_region = not same_country and WIDER_REGION[article.country] == WIDER_REGION[profile.country]
    score = 4.5 * field_match + 3.0 * topic_match + 2.5 * same_country + 1.0 * same_region
    place = ("same country" if same_country else "same wider region" if same_region else "different region")
    reasoning = (f"Article sector {article.field}, reader field {profile.field}: "
                 f"{'match' if field_match else 'no match'}. Topic {article.topic}: "
                 f"{'one of the reader interests' if topic_match else 'not a reader interest'}. "
                 f"Article country {article.country}, reader country {profile.country}: {place}.")
    return min(score, 10.0), reasoning


def scored_record(profile: Profile, article: Article) -> dict:
    score, reasoning = relevance(profile, article)
    return {"profile_id": profile.id, "profile": profile.text(), "article_id": article.id,
            "title": article.title, "article": article.text, "score": score, "reasoning": reasoning}


def pick_profiles(article: Article, count: int, rng: random.Random) -> list[Profile]:
    """Mostly random readers; in one article of three, one reader from the article's field, so that the
    rare high bands exist in useful numbers (the real data came skewed the same way)."""
    chosen = rng.sample(PROFILES, count)
    same_field = [p for p in PROFILES if p.field == article.field and p not in chosen]
    if same_field and rng.random() < 1 / 3:
        chosen[0] = rng.choice(same_field)
    return chosen


def make_records(articles: int, profiles_per_article: int, seed: int, first_index: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for index in range(first_index, first_index + articles):
        article = make_article(index, rng)
        records += [scored_record(p, article) for p in pick_profiles(article, profiles_per_article, rng)]
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def tokenizer_corpus(records: list[dict]) -> list[str]:
    from .data import SYSTEM_PROMPT, scoring_completion, scoring_messages

    texts = [SYSTEM_PROMPT] + [p.text() for p in PROFILES]
    for r in records:
        texts += [m.content for m in scoring_messages(r["profile"], r["title"], r["article"])[1:]]
        texts.append(scoring_completion(r["score"], r["reasoning"]))
    return texts


def make_demo_data(out_dir: str | Path, train_articles: int = 600, eval_articles: int = 60,
                   profiles_per_article: int = 5, vocab_size: int = 2048, seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl, eval.jsonl and a tokenizer folder under `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = make_records(train_articles, profiles_per_article, seed)
    evaluation = make_records(eval_articles, profiles_per_article, seed + 1, first_index=train_articles)
    paths = {"train": out / "train.jsonl", "eval": out / "eval.jsonl", "tokenizer": out / "tokenizer"}
    write_jsonl(train, paths["train"])
    write_jsonl(evaluation, paths["eval"])
    tokenizer: Tokenizer = train_chatml_tokenizer(tokenizer_corpus(train), vocab_size=vocab_size)
    tokenizer.save_pretrained(paths["tokenizer"])
    return paths
