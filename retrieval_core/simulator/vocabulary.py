"""The marketplace's language: categories, attributes, and how sellers and buyers word them.

Sellers write titles in *seller* words; buyers type queries that often use a *buyer* synonym instead
("custom" for "personalized", "925" for "sterling silver", "tee" for "t-shirt"). That mismatch is the
semantic gap a lexical engine cannot cross and the paper's embeddings are built to close.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    path: str  # "jewelry > necklaces"
    noun: str  # the seller's head noun, used in titles
    buyer_nouns: tuple[str, ...]  # how buyers say it (first one is the common broad query)
    materials: tuple[str, ...]
    price_median: float


CATEGORIES: tuple[Category, ...] = (
    Category("jewelry > necklaces", "necklace", ("necklace", "pendant", "choker"),
             ("sterling silver", "gold", "rose gold", "brass", "pearl", "crystal"), 38.0),
    Category("jewelry > rings", "ring", ("ring", "band"),
             ("sterling silver", "gold", "rose gold", "titanium", "moissanite", "wood"), 55.0),
    Category("jewelry > earrings", "earrings", ("earrings", "studs", "hoops"),
             ("sterling silver", "gold", "pearl", "crystal", "brass", "polymer clay"), 28.0),
    Category("jewelry > bracelets", "bracelet", ("bracelet", "bangle", "cuff"),
             ("sterling silver", "leather", "gold", "beaded", "brass", "macrame"), 30.0),
    Category("home > candles", "candle", ("candle", "soy candle", "scented candle"),
             ("soy wax", "beeswax", "coconut wax", "glass", "ceramic"), 22.0),
    Category("home > pillows", "throw pillow", ("pillow", "cushion cover", "pillow cover"),
             ("linen", "cotton", "velvet", "wool", "canvas"), 35.0),
    Category("home > wall art", "wall art print", ("wall art", "poster", "print"),
             ("paper", "canvas", "wood", "metal"), 25.0),
    Category("home > mugs", "mug", ("mug", "coffee cup", "tea cup"),
             ("ceramic", "stoneware", "porcelain", "enamel", "glass"), 24.0),
    Category("home > blankets", "throw blanket", ("blanket", "throw", "quilt"),
             ("wool", "cotton", "chunky knit", "fleece", "linen"), 70.0),
    Category("clothing > t-shirts", "t-shirt", ("t-shirt", "tee", "shirt"),
             ("cotton", "organic cotton", "linen", "bamboo"), 26.0),
    Category("clothing > dresses", "dress", ("dress", "gown", "sundress"),
             ("linen", "cotton", "silk", "velvet", "lace"), 85.0),
    Category("clothing > sweaters", "sweater", ("sweater", "jumper", "cardigan"),
             ("wool", "merino", "alpaca", "cotton", "cashmere"), 90.0),
    Category("accessories > bags", "tote bag", ("bag", "tote", "purse"),
             ("leather", "canvas", "cotton", "vegan leather", "jute"), 45.0),
    Category("accessories > scarves", "scarf", ("scarf", "shawl", "wrap"),
             ("silk", "wool", "cashmere", "cotton", "linen"), 32.0),
    Category("accessories > hats", "beanie hat", ("hat", "beanie", "cap"),
             ("wool", "cotton", "alpaca", "straw", "felt"), 27.0),
    Category("toys > plush", "plush toy", ("stuffed animal", "plushie", "soft toy"),
             ("cotton", "wool felt", "minky", "organic cotton"), 29.0),
    Category("toys > puzzles", "jigsaw puzzle", ("puzzle", "jigsaw", "wooden puzzle"),
             ("wood", "cardboard", "paper"), 31.0),
    Category("craft > yarn", "yarn skein", ("yarn", "wool yarn", "knitting yarn"),
             ("merino", "alpaca", "cotton", "mohair", "acrylic"), 18.0),
    Category("craft > beads", "bead set", ("beads", "bead kit", "jewelry beads"),
             ("glass", "wood", "clay", "crystal", "gemstone"), 12.0),
    Category("wedding > invitations", "wedding invitation", ("invitation", "invite", "wedding invites"),
             ("paper", "cardstock", "vellum", "acrylic"), 60.0),
    Category("wedding > cake toppers", "cake topper", ("cake topper", "topper", "cake decoration"),
             ("acrylic", "wood", "glitter", "gold"), 19.0),
    Category("paper > stickers", "sticker sheet", ("stickers", "decal", "sticker pack"),
             ("vinyl", "paper", "holographic"), 6.0),
    Category("paper > journals", "journal notebook", ("journal", "notebook", "planner"),
             ("leather", "paper", "linen", "kraft"), 28.0),
    Category("pets > collars", "dog collar", ("dog collar", "collar", "pet collar"),
             ("leather", "nylon", "biothane", "cotton"), 24.0),
    Category("pets > beds", "pet bed", ("dog bed", "cat bed", "pet bed"),
             ("cotton", "fleece", "canvas", "wool"), 65.0),
    Category("bath > soap", "soap bar", ("soap", "bar soap", "natural soap"),
             ("goat milk", "shea butter", "olive oil", "charcoal"), 9.0),
    Category("kitchen > cutting boards", "cutting board", ("cutting board", "chopping board", "charcuterie board"),
             ("walnut", "maple", "olive wood", "bamboo", "acacia"), 48.0),
    Category("art > paintings", "original painting", ("painting", "artwork", "canvas art"),
             ("oil", "acrylic", "watercolor", "canvas"), 150.0),
)

COLORS: tuple[str, ...] = ("black", "white", "red", "blue", "green", "pink", "purple", "yellow",
                           "brown", "beige", "grey", "gold tone")
STYLES: tuple[str, ...] = ("boho", "minimalist", "vintage", "rustic", "modern", "gothic",
                           "cottagecore", "art deco")
OCCASIONS: tuple[str, ...] = ("birthday", "wedding", "christmas", "anniversary", "mothers day",
                              "graduation", "halloween", "baby shower")
# Phrases sellers add to titles that carry no attribute (noise a lexical engine still matches on).
FILLERS: tuple[str, ...] = ("handmade", "gift for her", "gift for him", "unique gift", "personalized",
                            "cute", "large", "small", "set of 2", "eco friendly", "made to order")

# Buyer words for seller words: the semantic gap. Several words have more than one.
BUYER_SYNONYMS: dict[str, tuple[str, ...]] = {
    "sterling silver": ("925 silver", "925"),
    "gold": ("golden", "14k"),
    "rose gold": ("pink gold",),
    "personalized": ("custom", "monogram", "engraved"),
    "handmade": ("hand made", "artisan"),
    "boho": ("bohemian", "hippie"),
    "minimalist": ("simple", "minimal", "dainty"),
    "vintage": ("retro", "antique", "old fashioned"),
    "rustic": ("farmhouse", "country"),
    "modern": ("contemporary", "mid century"),
    "gothic": ("goth", "dark"),
    "cottagecore": ("cottage", "floral"),
    "art deco": ("1920s", "gatsby"),
    "grey": ("gray",),
    "beige": ("cream", "neutral"),
    "gold tone": ("gold color",),
    "mothers day": ("mom", "for mother"),
    "anniversary": ("for wife", "for husband"),
    "baby shower": ("new baby", "newborn"),
    "graduation": ("grad", "graduate"),
    "christmas": ("xmas", "holiday"),
    "soy wax": ("natural wax",),
    "vegan leather": ("faux leather", "pleather"),
    "merino": ("merino wool",),
    "walnut": ("hardwood",),
    "velvet": ("velour",),
}

COUNTRIES: tuple[str, ...] = ("US", "GB", "DE", "FR", "CA", "AU", "NL", "IT", "ES", "IE")
COUNTRY_WEIGHTS: tuple[float, ...] = (0.45, 0.14, 0.09, 0.07, 0.07, 0.05, 0.04, 0.04, 0.03, 0.02)
CURRENCY_BY_COUNTRY: dict[str, str] = {
    "US": "USD", "GB": "GBP", "DE": "EUR", "FR": "EUR", "CA": "CAD", "AU": "AUD",
    "NL": "EUR", "IT": "EUR", "ES": "EUR", "IE": "EUR",
}
