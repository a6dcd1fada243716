"""A seeded, vectorised marketplace: shops, products, users with tastes, and their search sessions.

How the conditions of the paper arise:

* **Broad (head) queries** say only the category ("necklace"). What the user buys depends on a
  *hidden* intent drawn from their persistent taste (style, colour, price level, country), so only
  their history predicts the purchase.
* **Tail queries** spell out attributes ("boho 925 silver pendant for mom"). They are drawn from a
  Zipf-popular pool (so co-engagement accumulates), and at ``tail_gap_rate`` they use buyer words a
  seller never writes (synonyms, misspellings): text semantics, not lexical overlap, finds them.
* A **legacy lexical engine** ranks candidates by the attributes the query spells in seller words
  plus quality; users examine positions with a bias, and click, favourite, add to cart and buy by a
  utility of relevance, taste, quality, price and location.

Ids in the written tables are 1-based (``product_id = index + 1``, likewise users and shops).
All randomness flows from one ``numpy.random.Generator`` per entity / per day, seeded from the
config, so the same config writes byte-identical files.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from retrieval_core.simulator.config import WorldConfig
from retrieval_core.simulator.vocabulary import (
    BUYER_SYNONYMS,
    CATEGORIES,
    COLORS,
    COUNTRIES,
    COUNTRY_WEIGHTS,
    FILLERS,
    OCCASIONS,
    STYLES,
)

N_CAT, N_STYLE, N_COLOR, N_OCC = len(CATEGORIES), len(STYLES), len(COLORS), len(OCCASIONS)
MAX_MATERIALS = max(len(c.materials) for c in CATEGORIES)
NO_OCCASION = -1
# Query classes, as written in the diagnostics.
HEAD, TORSO, TAIL = 0, 1, 2
QUERY_CLASSES = ("head", "torso", "tail")


def _rng(config: WorldConfig, *stream: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, *stream])


def _utc(day: dt.date) -> pd.Timestamp:
    return pd.Timestamp(day, tz="UTC")


# --------------------------------------------------------------------------------------------------
# Entities
# --------------------------------------------------------------------------------------------------


@dataclass
class Shops:
    style: np.ndarray
    country: np.ndarray
    price_level: np.ndarray
    quality: np.ndarray
    main_category: np.ndarray


@dataclass
class Products:
    shop: np.ndarray
    category: np.ndarray
    style: np.ndarray
    color: np.ndarray
    material: np.ndarray  # index into the category's materials
    occasion: np.ndarray  # -1 for none
    quality: np.ndarray
    price: np.ndarray
    created_day: np.ndarray  # days relative to start (negative: before the window)

    def __len__(self) -> int:
        return len(self.shop)


@dataclass
class Users:
    country: np.ndarray
    signup_day: np.ndarray
    style_taste: np.ndarray  # (n, N_STYLE) probabilities
    color_taste: np.ndarray
    category_taste: np.ndarray
    price_level: np.ndarray
    activity: np.ndarray


@dataclass
class TailPool:
    """Specific queries that buyers type again and again (Zipf-popular), each from a real product."""

    text: np.ndarray  # object array of str
    category: np.ndarray
    style: np.ndarray  # -1 when the query does not say it
    color: np.ndarray
    material: np.ndarray
    occasion: np.ndarray
    gapped: np.ndarray  # bool: uses a word no seller writes for that attribute
    popularity: np.ndarray
    source: np.ndarray  # index of the product the query was written from (what the buyer wants)


def make_shops(config: WorldConfig) -> Shops:
    rng = _rng(config, 1)
    n = config.n_shops
    return Shops(
        style=rng.integers(0, N_STYLE, n),
        country=rng.choice(len(COUNTRIES), n, p=COUNTRY_WEIGHTS),
        price_level=np.exp(rng.normal(0, 0.3, n)),
        quality=rng.normal(0, 0.6, n),
        main_category=rng.integers(0, N_CAT, n),
    )


def make_products(config: WorldConfig, shops: Shops) -> Products:
    rng = _rng(config, 2)
    n = config.n_products
    # Shop sizes are skewed: a few big shops, many small ones.
    shop_weight = rng.pareto(1.5, config.n_shops) + 1.0
    shop = rng.choice(config.n_shops, n, p=shop_weight / shop_weight.sum())
    category = np.where(rng.random(n) < 0.8, shops.main_category[shop], rng.integers(0, N_CAT, n))
    style = np.where(rng.random(n) < config.shop_style_loyalty, shops.style[shop], rng.integers(0, N_STYLE, n))
    n_materials = np.array([len(c.materials) for c in CATEGORIES])
    material = (rng.random(n) * n_materials[category]).astype(np.int64)
    occasion = np.where(rng.random(n) < 0.4, rng.integers(0, N_OCC, n), NO_OCCASION)
    quality = shops.quality[shop] + rng.normal(0, 0.5, n)
    median = np.array([c.price_median for c in CATEGORIES])
    price = np.round(median[category] * shops.price_level[shop] * np.exp(rng.normal(0, 0.35, n)), 2)
    price = np.maximum(price, 1.0)
    new = rng.random(n) < config.new_product_share
    created_day = np.where(new, rng.integers(0, config.days, n), -rng.integers(1, 730, n))
    return Products(shop, category, style, rng.integers(0, N_COLOR, n), material, occasion,
                    quality, price, created_day)


def make_users(config: WorldConfig) -> Users:
    rng = _rng(config, 3)
    n = config.n_users
    alpha = config.taste_concentration
    new = rng.random(n) < config.new_user_share
    return Users(
        country=rng.choice(len(COUNTRIES), n, p=COUNTRY_WEIGHTS),
        signup_day=np.where(new, rng.integers(0, config.days, n), -rng.integers(1, 1500, n)),
        style_taste=rng.dirichlet(np.full(N_STYLE, alpha), n),
        color_taste=rng.dirichlet(np.full(N_COLOR, alpha), n),
        category_taste=rng.dirichlet(np.full(N_CAT, alpha * 2), n),
        price_level=np.exp(rng.normal(0, 0.35, n)),
        activity=np.exp(rng.normal(0, config.activity_sigma, n)),
    )


# --------------------------------------------------------------------------------------------------
# Text: titles, tags, queries
# --------------------------------------------------------------------------------------------------


def misspell(word: str, rng: np.random.Generator) -> str:
    """A plausible typo: drop, double or swap a letter (never returns the word unchanged)."""
    if len(word) < 4:
        return word + word[-1]
    i = int(rng.integers(1, len(word) - 1))
    kind = int(rng.integers(0, 3))
    if kind == 0:
        out = word[:i] + word[i + 1:]
    elif kind == 1:
        out = word[:i] + word[i] + word[i:]
    else:
        out = word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return out if out != word else word[:i] + word[i + 1:]


def product_titles(products: Products, config: WorldConfig) -> list[str]:
    """Seller-worded titles in a few realistic templates."""
    rng = _rng(config, 4)
    template = rng.integers(0, 3, len(products))
    filler = rng.integers(0, len(FILLERS), len(products))
    titles = []
    for i in range(len(products)):
        cat = CATEGORIES[products.category[i]]
        style, color = STYLES[products.style[i]], COLORS[products.color[i]]
        material = cat.materials[products.material[i]]
        occ = products.occasion[i]
        occasion = f" {OCCASIONS[occ]} gift" if occ != NO_OCCASION else ""
        t = template[i]
        if t == 0:
            title = f"{style} {color} {material} {cat.noun}{occasion}, {FILLERS[filler[i]]}"
        elif t == 1:
            title = f"{material} {cat.noun} in {color} - {style}{occasion} - {FILLERS[filler[i]]}"
        else:
            title = f"{FILLERS[filler[i]]} {cat.noun}, {color} {material}, {style} style{occasion}"
        titles.append(title.title())
    return titles


def product_tags(products: Products, config: WorldConfig) -> list[list[str]]:
    rng = _rng(config, 5)
    add_synonym = rng.random(len(products)) < config.tag_synonym_rate
    pick = rng.integers(0, 1 << 30, len(products))
    tags = []
    for i in range(len(products)):
        cat = CATEGORIES[products.category[i]]
        style = STYLES[products.style[i]]
        t = [cat.noun, style, COLORS[products.color[i]], cat.materials[products.material[i]]]
        if products.occasion[i] != NO_OCCASION:
            t.append(OCCASIONS[products.occasion[i]])
        if add_synonym[i]:
            synonyms = BUYER_SYNONYMS.get(style) or cat.buyer_nouns
            t.append(synonyms[pick[i] % len(synonyms)])
        tags.append(t)
    return tags


def _buyer_word(seller_word: str, rng: np.random.Generator) -> str | None:
    synonyms = BUYER_SYNONYMS.get(seller_word)
    return None if not synonyms else synonyms[int(rng.integers(0, len(synonyms)))]


def _gap_noun(category: int) -> str:
    """A buyer noun with a word the seller's noun does not use ("dog bed" for "pet bed")."""
    cat = CATEGORIES[category]
    seller = set(cat.noun.split())
    return next(noun for noun in cat.buyer_nouns if set(noun.split()) - seller)


def make_tail_pool(config: WorldConfig, products: Products) -> TailPool:
    """Specific queries, each written from a real product's attributes (so an answer exists)."""
    rng = _rng(config, 6)
    n = max(50, int(config.n_products * config.tail_queries_per_product))
    src = rng.integers(0, len(products), n)
    category = products.category[src]
    # Say 2 or 3 of style / colour / material / occasion, always the category noun.
    says = rng.random((n, 4)) < 0.6
    says[np.arange(n), rng.integers(0, 4, n)] = True
    has_occ = products.occasion[src] != NO_OCCASION
    says[:, 3] &= has_occ
    style = np.where(says[:, 0], products.style[src], -1)
    color = np.where(says[:, 1], products.color[src], -1)
    material = np.where(says[:, 2], products.material[src], -1)
    occasion = np.where(says[:, 3], products.occasion[src], -1)
    gapped = rng.random(n) < config.tail_gap_rate
    texts = []
    for i in range(n):
        cat = CATEGORIES[category[i]]
        before = [w for w, v in ((STYLES[style[i]], style[i]), (COLORS[color[i]], color[i]),
                                 (cat.materials[material[i]] if material[i] >= 0 else "", material[i]))
                  if v >= 0]
        after = [OCCASIONS[occasion[i]]] if occasion[i] >= 0 else []
        noun = cat.noun
        if gapped[i]:
            # A word no seller writes: a buyer synonym for an attribute, a buyer noun, or a typo.
            slots = [(lst, j) for lst in (before, after) for j, w in enumerate(lst) if w in BUYER_SYNONYMS]
            roll = rng.random()
            if slots and roll < 0.6:
                lst, j = slots[int(rng.integers(0, len(slots)))]
                lst[j] = _buyer_word(lst[j], rng) or lst[j]
            elif roll < 0.85:
                noun = _gap_noun(category[i])
            else:
                first, *rest = noun.split()
                noun = " ".join([misspell(first, rng), *rest])
        texts.append(" ".join([*before, noun, *after]))
    popularity = 1.0 / np.arange(1, n + 1) ** config.tail_zipf
    return TailPool(np.array(texts, dtype=object), category, style, color, material, occasion, gapped,
                    rng.permutation(popularity), src)


# --------------------------------------------------------------------------------------------------
# One day of traffic
# --------------------------------------------------------------------------------------------------


@dataclass
class ProductIndex:
    """Products grouped by (category[, attribute]) so candidate sampling is a vectorised lookup."""

    order: dict[str, np.ndarray]
    start: dict[str, np.ndarray]
    count: dict[str, np.ndarray]

    @classmethod
    def build(cls, products: Products, live: np.ndarray) -> ProductIndex:
        keys = {
            "cat": products.category,
            "style": products.category * N_STYLE + products.style,
            "color": products.category * N_COLOR + products.color,
            "material": products.category * MAX_MATERIALS + products.material,
        }
        sizes = {"cat": N_CAT, "style": N_CAT * N_STYLE, "color": N_CAT * N_COLOR,
                 "material": N_CAT * MAX_MATERIALS}
        order, start, count = {}, {}, {}
        live_idx = np.flatnonzero(live)
        for name, key in keys.items():
            k = key[live_idx]
            o = np.argsort(k, kind="stable")
            order[name] = live_idx[o]
            count[name] = np.bincount(k, minlength=sizes[name])
            start[name] = np.concatenate([[0], np.cumsum(count[name])[:-1]])
        return cls(order, start, count)

    def sample(self, group: str, key: np.ndarray, k: int, rng: np.random.Generator,
               fallback: np.ndarray) -> np.ndarray:
        """``k`` random live products per row from group ``key`` (rows with an empty group: fallback)."""
        cnt = self.count[group][key]
        empty = cnt == 0
        pos = (rng.random((len(key), k)) * np.maximum(cnt, 1)[:, None]).astype(np.int64)
        out = self.order[group][np.minimum(self.start[group][key][:, None] + pos, len(self.order[group]) - 1)]
        return np.where(empty[:, None], fallback, out)


@dataclass
class DayTraffic:
    events: pa.Table
    sessions: pd.DataFrame  # diagnostics: the latent intent of each session


def simulate_day(config: WorldConfig, day_index: int, products: Products, shops: Shops, users: Users,
                 pool: TailPool) -> DayTraffic:
    """Sessions of one day: queries, the legacy engine's results, and what users did with them."""
    rng = _rng(config, 100, day_index)
    day = config.start_date + dt.timedelta(days=day_index)
    n = config.sessions_per_day
    live = products.created_day < day_index  # a product listed today is searchable from tomorrow
    index = ProductIndex.build(products, live)

    # Who searches: signed-in users by activity (once signed up), or anonymous with a random taste.
    signed_in = rng.random(n) >= config.signed_out_rate
    weight = np.where(users.signup_day <= day_index, users.activity, 0.0)
    user = rng.choice(len(weight), n, p=weight / weight.sum())
    anon_taste = rng.integers(0, len(users.activity), n)  # borrow a taste profile, not an identity
    taster = np.where(signed_in, user, anon_taste)

    def draw(probs: np.ndarray) -> np.ndarray:  # one categorical draw per row
        return (probs.cumsum(axis=1) < rng.random((len(probs), 1))).sum(axis=1).clip(max=probs.shape[1] - 1)

    # The latent intent: taste-driven attributes, possibly overridden by what a tail query says.
    qclass = np.select([rng.random(n) < config.head_share,
                        rng.random(n) < config.torso_share / max(1e-9, 1 - config.head_share)],
                       [HEAD, TORSO], TAIL)
    category = draw(users.category_taste[taster])
    style = draw(users.style_taste[taster])
    color = draw(users.color_taste[taster])
    n_materials = np.array([len(c.materials) for c in CATEGORIES])
    material = (rng.random(n) * n_materials[category]).astype(np.int64)
    occasion = np.full(n, NO_OCCASION)
    says = np.zeros((n, 4), dtype=bool)  # style, color, material, occasion spelled in the query
    gapped = np.zeros(n, dtype=bool)
    tail_id = np.full(n, -1)

    tail = np.flatnonzero(qclass == TAIL)
    # Of a few popular specific queries that come to mind, a user types the one closest to their taste.
    options = rng.choice(len(pool.popularity), (len(tail), 6), p=pool.popularity / pool.popularity.sum())
    fit = (np.log(np.where(pool.style[options] >= 0,
                           users.style_taste[taster[tail, None], pool.style[options].clip(0)], 1 / N_STYLE))
           + np.log(np.where(pool.color[options] >= 0,
                             users.color_taste[taster[tail, None], pool.color[options].clip(0)], 1 / N_COLOR))
           + rng.gumbel(0, 1.0, options.shape))
    tid = options[np.arange(len(tail)), fit.argmax(axis=1)]
    tail_id[tail] = tid
    category[tail] = pool.category[tid]
    for col, attr in enumerate((pool.style, pool.color, pool.material, pool.occasion)):
        said = attr[tid] >= 0
        says[tail, col] = said
        target = (style, color, material, occasion)[col]
        target[tail[said]] = attr[tid][said]
    gapped[tail] = pool.gapped[tid]

    torso = np.flatnonzero(qclass == TORSO)
    torso_attr = rng.integers(0, 3, len(torso))
    says[torso, torso_attr] = True
    torso_gap = rng.random(len(torso)) < config.torso_gap_rate
    head_typo = rng.random(n) < config.head_misspelling_rate

    queries = np.empty(n, dtype=object)
    queries[tail] = pool.text[tid]
    noun_pick = rng.integers(0, 1 << 30, n)
    for i in np.flatnonzero(qclass != TAIL):
        cat = CATEGORIES[category[i]]
        noun = cat.buyer_nouns[0] if noun_pick[i] % 10 < 7 else cat.buyer_nouns[noun_pick[i] % len(cat.buyer_nouns)]
        if qclass[i] == HEAD:
            queries[i] = misspell(noun, rng) if head_typo[i] else noun
            continue
        a = int(np.argmax(says[i]))
        word = (STYLES[style[i]], COLORS[color[i]], cat.materials[material[i]])[a]
        j = int(np.searchsorted(torso, i))
        if torso_gap[j] and word in BUYER_SYNONYMS:
            word = _buyer_word(word, rng) or word
            gapped[i] = True
        queries[i] = f"{word} {noun}"

    # The legacy engine: candidates from the category and from each attribute the query spells
    # lexically (a buyer synonym is invisible to it), ranked by lexical match + quality.
    k = config.candidates_per_session
    fallback = rng.integers(0, len(products), (n, 1))
    k_attr = k // 4
    lexical = says & ~gapped[:, None]
    cand = np.concatenate([
        index.sample("cat", category, k - 3 * k_attr, rng, fallback),
        index.sample("style", category * N_STYLE + style, k_attr, rng, fallback),
        index.sample("color", category * N_COLOR + color, k_attr, rng, fallback),
        index.sample("material", category * MAX_MATERIALS + material, k_attr, rng, fallback),
    ], axis=1)
    # Only groups the query names are really retrieved; the others are replaced by category picks.
    named = np.concatenate([np.ones((n, k - 3 * k_attr), bool)] +
                           [np.repeat(lexical[:, [c]], k_attr, axis=1) for c in range(3)], axis=1)
    cand = np.where(named, cand, index.sample("cat", category, k, rng, fallback))
    match = np.stack([
        products.style[cand] == style[:, None],
        products.color[cand] == color[:, None],
        products.material[cand] == material[:, None],
        products.occasion[cand] == occasion[:, None],
    ], axis=2)
    in_cat = products.category[cand] == category[:, None]
    lex_score = (match & lexical[:, None, :]).sum(axis=2) + 2.0 * in_cat
    lex_score = lex_score + 0.3 * products.quality[cand] + rng.normal(0, 0.5, cand.shape)
    # A product sampled twice is shown once.
    srt = np.sort(cand, axis=1)
    dup_sorted = np.concatenate([np.zeros((n, 1), bool), srt[:, 1:] == srt[:, :-1]], axis=1)
    order_c = np.argsort(cand, axis=1, kind="stable")
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order_c, dup_sorted, axis=1)
    lex_score = np.where(dup, -np.inf, lex_score)
    r = config.results_shown
    top = np.argsort(-lex_score, axis=1, kind="stable")[:, :r]
    shown = np.take_along_axis(cand, top, axis=1)
    shown_match = np.take_along_axis(match, top[:, :, None], axis=1)
    shown_in_cat = np.take_along_axis(in_cat, top, axis=1)

    # The choice model: what the query says matters most; the hidden rest follows taste.
    w_explicit = config.explicit_match_weight
    w_hidden = config.taste_strength
    # Hidden wants: style matters most, colour less, material barely; an unstated occasion not at all.
    hidden_w = w_hidden * np.array([1.0, 0.7, 0.15, 0.0])
    attr_w = np.where(says[:, None, :], w_explicit, hidden_w[None, None, :])
    relevance = (shown_match * attr_w).sum(axis=2) + 3.0 * shown_in_cat - 3.0
    price_ratio = products.price[shown] / (np.array([c.price_median for c in CATEGORIES])[category][:, None]
                                           * users.price_level[taster][:, None])
    utility = (relevance + config.quality_weight * products.quality[shown]
               - config.price_sensitivity * np.abs(np.log(price_ratio))
               + config.same_country_bonus * (shops.country[products.shop[shown]] == users.country[taster][:, None])
               + rng.gumbel(0, 0.7, shown.shape))
    position = np.arange(1, r + 1)
    examined = rng.random(shown.shape) < 1.0 / position[None, :] ** config.position_bias

    def sig(x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-x))

    click = examined & (rng.random(shown.shape) < sig(utility - config.click_threshold))
    favorite = click & (rng.random(shown.shape) < 0.35 * sig(utility - config.click_threshold - 1))
    cart = click & (rng.random(shown.shape) < sig(utility - config.purchase_threshold + 0.5))
    best = np.argmax(np.where(cart, utility, -np.inf), axis=1)
    buys = cart.any(axis=1) & (rng.random(n) < sig(utility[np.arange(n), best] - config.purchase_threshold + 1.5))
    purchase = np.zeros_like(cart)
    purchase[np.flatnonzero(buys), best[buys]] = True

    # Timestamps: a session starts in the day, engagement follows within minutes.
    start = _utc(day) + pd.to_timedelta(rng.integers(0, 86_400 - 3_600, n), unit="s")
    start_us = start.asi8 // 1000
    kinds = [("impression", np.ones_like(click), 0), ("click", click, 5), ("favorite", favorite, 40),
             ("add_to_cart", cart, 60), ("purchase", purchase, 300)]
    day_tag = day.strftime("%Y%m%d")
    session_ids = np.char.add(f"s{day_tag}-", np.arange(n).astype(str))
    parts = []
    for code, (_, mask, delay) in enumerate(kinds):
        s_idx, p_idx = np.nonzero(mask)
        ts = start_us[s_idx] + (p_idx * 2 + delay) * 1_000_000 + (code * 1_000)
        parts.append(pd.DataFrame({
            "s": s_idx, "p": p_idx, "kind": code, "ts": ts,
        }))
    ev = pd.concat(parts, ignore_index=True).sort_values(["ts", "s", "p", "kind"], kind="stable")
    s_idx, p_idx, kind_code = ev["s"].to_numpy(), ev["p"].to_numpy(), ev["kind"].to_numpy()
    kind_names = np.array([k[0] for k in kinds])
    event_id = np.char.add(np.char.add(session_ids[s_idx], "-"),
                           np.char.add((p_idx + 1).astype(str), np.char.add("-", kind_names[kind_code])))
    user_col = pa.array(np.where(signed_in[s_idx], user[s_idx] + 1, 0), pa.int64(), mask=~signed_in[s_idx])
    events = pa.table({
        "event_id": pa.array(event_id.astype(object), pa.string()),
        "ts": pa.array(ev["ts"].to_numpy(), pa.timestamp("us", "UTC")),
        "user_id": user_col,
        "session_id": pa.array(session_ids[s_idx].astype(object), pa.string()),
        "query": pa.array(queries[s_idx], pa.string()),
        "product_id": pa.array(shown[s_idx, p_idx].astype(np.int64) + 1, pa.int64()),
        "event_type": pa.array(kind_names[kind_code].astype(object), pa.string()),
        "position": pa.array((p_idx + 1).astype(np.int32), pa.int32()),
    })
    sessions = pd.DataFrame({
        "session_id": session_ids, "day": day, "user_id": np.where(signed_in, user + 1, -1),
        "query": queries, "query_class": np.array(QUERY_CLASSES)[qclass], "category": category,
        "style": style, "color": color, "material": material, "occasion": occasion,
        "says_style": says[:, 0], "says_color": says[:, 1], "says_material": says[:, 2],
        "says_occasion": says[:, 3], "gapped": gapped, "tail_query_id": tail_id,
        "wanted_product": np.where(tail_id >= 0, pool.source[tail_id] + 1, -1),
        "purchased_product": np.where(buys, shown[np.arange(n), best] + 1, -1),
    })
    return DayTraffic(events, sessions)
