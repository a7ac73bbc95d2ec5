"""Duplicate-id detection in hashed sorted runs against a plain dict."""

import random

from llm2vec_fast.corpus.duplicates import FirstOccurrences, pack_location, unpack_location


def test_first_occurrences_equal_a_dict_over_many_batches():
    rng = random.Random(0)
    seen = FirstOccurrences()
    oracle: dict[str, int] = {}
    line = 0
    for _ in range(60):  # batches of 0-300 ids, many repeated within and across batches: runs merge
        ids = [f"id-{rng.randrange(4000)}" for _ in range(rng.randrange(301))]
        locations = [pack_location(rng.randrange(3), line + k) for k in range(len(ids))]
        line += len(ids)
        expected = []
        for row_id, location in zip(ids, locations):
            expected.append(oracle.get(row_id))
            oracle.setdefault(row_id, location)
        assert seen.check(ids, locations) == expected
    assert len(seen) == len(oracle)
    assert len(seen._runs) <= 12  # log-structured: a few runs, not one per batch


def test_ids_differing_in_any_character_are_distinct_and_locations_round_trip():
    seen = FirstOccurrences()
    ids = ["a", "A", "a ", "é", "e\u0301", "", "a"]
    assert seen.check(ids, list(range(7))) == [None] * 6 + [0]
    assert unpack_location(pack_location(5, 123_456_789_012)) == (5, 123_456_789_012)
