"""The `toy-multi8` data set: toy-multi with C = 8 classes (its four plus vegetable, vehicle, instrument, tool)
and VOC-like co-occurrence: four class pairs appear together far more often than independent draws would give.

Only the class lists live here; composition, splits, bias and determinism are `data_shards.toy_multi`'s.
"""
from __future__ import annotations

from .toy_multi import CLASS_GLOBS, CLASS_GROUPS, CLASSES, EXCLUDED, TEST_INSTANCES, MultiSpec, build_toy_multi

STAMPS = "tuxpaint/stamps"
NEW_CLASSES = ["vegetable", "vehicle", "instrument", "tool"]
# Left out as a class: flowers. Four land background photos (mate FreshFlower, YellowFlower, Garden, LadyBird)
# are flower close-ups, so a flower class would have unlabelled flowers all over the backgrounds; flowers stay
# unlabelled distractors, as in toy-multi. Also left out: nuts (4 stamps), mushrooms (3 ceps), insects (two of
# nine are drawings), trees (a class drawn as big as the canvas hides the background cue), household objects
# (one of each kind, no class).
CLASSES8 = CLASSES + NEW_CLASSES
# The four toy-multi classes keep their groups. The new classes' groups are an assigned cue, not realism for
# instrument and tool: 4 classes per group, so each background group is evidence for four classes and
# test_conflict moves every class by the same amount.
CLASS_GROUPS8 = {**CLASS_GROUPS, "vegetable": "land", "vehicle": "land", "instrument": "water", "tool": "water"}

# Photo cut-outs per class (each stamp looked at on a contact sheet).
CLASS_GLOBS8 = {
    **CLASS_GLOBS,
    "vegetable": (f"{STAMPS}/food/vegetables/*.png",),
    "vehicle": (f"{STAMPS}/vehicles/*.png", f"{STAMPS}/vehicles/*/*.png", f"{STAMPS}/vehicles/*/*/*.png",
                f"{STAMPS}/military/vehicles/*.png"),
    "instrument": (f"{STAMPS}/hobbies/music/*/*.png",),  # the .svg stamps there are drawings (not globbed)
    "tool": (f"{STAMPS}/household/tools/*.png",),
}
EXCLUDED8 = {
    **EXCLUDED,
    # food/vegetables: all 18 are photo cut-outs. plants/eggplant, lettuce_bolted, lavender, thyme (whole plants)
    # are not globbed.
    "vegetable": set(),
    # 7spoke256, wheel_tractor: a wheel and a tyre, not vehicles; sedan_police(_mirror): only the decals are
    # opaque (13 % of the box), the car body is missing; dumper_mirror, bradley_mirror: mirror images of dumper and
    # bradley (flips happen anyway); 747, f22_raptor, balloon360: aircraft and chineseJunk, walnutBoat: ships,
    # which would contradict "vehicles on land". The .svg vehicles are drawings (not globbed).
    "vehicle": {"7spoke256", "wheel_tractor", "sedan_police", "sedan_police_mirror", "dumper_mirror",
                "bradley_mirror", "747", "f22_raptor", "balloon360", "chineseJunk", "walnutBoat"},
    "instrument": set(),
    # cementmixer: a wheeled machine, close to a vehicle; measuring_tape_mirror: a mirror image of measuring_tape.
    "tool": {"cementmixer", "measuring_tape_mirror"},
}
# Test-only instances (~30 % per class), near-duplicates on one side: the five peppers-and-alliums (three
# peppers, garlic bulb and string), the two armoured vehicles and the two big trucks, the bowed strings and the
# trumpet (the four guitars and three drums stay in train), the three wrenches.
TEST_INSTANCES8 = {
    **TEST_INSTANCES,
    "vegetable": {"pepper", "yellowpepper", "chilepepper", "garlic", "garlics"},
    "vehicle": {"bradley", "infantry-stryker", "firetruck", "garbagetruck"},
    "instrument": {"violin", "cello", "trumpet"},
    "tool": {"wrench", "wrench_adjustable", "wrench_plumbers"},
}
# Distractors of no class, never labelled: flowers, balls and sports gear, dishes (no vehicles, tools or
# food any more: they are classes or close to one).
DISTRACTOR_GLOBS8 = (f"{STAMPS}/plants/flowers/*.png", f"{STAMPS}/sports/*.png", f"{STAMPS}/household/dishes/*.png")
# rugby_goal_posts: a thin frame, almost no pixels; the glass: nearly transparent.
DISTRACTOR_EXCLUDED8 = frozenset({"sports/rugby_goal_posts", "household/dishes/glass"})

# VOC-like co-occurrence (person+bicycle, chair+table): each pair shares a background group, so an image stays
# aligned (or in conflict) for every object in it. Each additional object (0-2 per image, uniform) is the primary
# class's partner with probability 0.6, else a uniform class of the primary's group (the partner included):
# P(partner) = 0.6 + 0.4 / 4 = 0.7 per extra object, 0.1 for each other class of the group, primary included.
PAIRS8 = (("bird", "fish"), ("instrument", "tool"), ("fruit", "vegetable"), ("mammal", "vehicle"))
PARTNER_PROBABILITY8 = 0.6

TOY_MULTI8 = MultiSpec(
    name="toy-multi8",
    classes=CLASSES8,
    class_groups=CLASS_GROUPS8,
    class_globs=CLASS_GLOBS8,
    excluded=EXCLUDED8,
    test_instances=TEST_INSTANCES8,
    distractor_globs=DISTRACTOR_GLOBS8,
    distractor_excluded=DISTRACTOR_EXCLUDED8,
    partners={**{a: b for a, b in PAIRS8}, **{b: a for a, b in PAIRS8}},
    partner_probability=PARTNER_PROBABILITY8,
)


def build_toy_multi8(out_dir: str, **kwargs) -> str:
    """Build toy-multi8 into `out_dir` (shards, then manifest.json); keyword arguments as build_toy_multi's."""
    return build_toy_multi(out_dir, spec=TOY_MULTI8, **kwargs)
