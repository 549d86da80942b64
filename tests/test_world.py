"""The synthetic world: deterministic, cuts where the scene records say, checkable questions, mp4."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from synthetic.world import (
    COLORS,
    KINDS,
    Question,
    WorldConfig,
    answer_on_view,
    check_answerable,
    generate_stream,
    make_question,
    questions,
    read_mp4,
    vocabulary,
    write_mp4,
)


@pytest.fixture(scope="module")
def stream():
    return generate_stream(300, seed=3)


def test_deterministic_per_seed(stream):
    again = generate_stream(300, seed=3)
    assert np.array_equal(stream.frames, again.frames)
    assert stream.scenes == again.scenes and stream.cuts == again.cuts
    assert questions(stream, 40, seed=5) == questions(again, 40, seed=5)
    other = generate_stream(300, seed=4)
    assert not np.array_equal(stream.frames, other.frames)
    assert questions(stream, 40, seed=5) != questions(stream, 40, seed=6)


def test_shapes_times_and_scene_records(stream):
    cfg = stream.config
    assert stream.frames.shape == (300, cfg.frame_size, cfg.frame_size, 3) and stream.frames.dtype == np.uint8
    assert np.allclose(stream.times, np.arange(300) / cfg.fps)
    assert stream.scenes[0].start == 0 and stream.scenes[-1].end == 300
    for a, b in zip(stream.scenes, stream.scenes[1:]):
        assert a.end == b.start
        assert a.shape != b.shape and a.background != b.background
    for s in stream.scenes[:-1]:
        assert cfg.scene_min <= s.end - s.start <= cfg.scene_max
    if cfg.fixed_colors:  # one colour per shape, one shape per colour within a stream
        pairs = {(s.shape, s.color) for s in stream.scenes}
        assert len({p[0] for p in pairs}) == len(pairs) == len({p[1] for p in pairs})


def test_cuts_exactly_where_scene_records_say(stream):
    assert stream.cuts == [s.start for s in stream.scenes[1:]]
    f = stream.frames.astype(np.int32)
    # background (corner pixel) is constant inside a scene and changes at every cut
    corner = f[:, 0, 0, :]
    for s in stream.scenes:
        assert (corner[s.start : s.end] == np.array(s.background)).all()
    diffs = np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3))
    cut_set = set(stream.cuts)
    within = [d for i, d in enumerate(diffs, start=1) if i not in cut_set]
    across = [d for i, d in enumerate(diffs, start=1) if i in cut_set]
    assert max(within) < min(across)


def test_object_colour_is_rendered(stream):
    for s in stream.scenes[:10]:
        frame = stream.frames[s.start].reshape(-1, 3).astype(int)
        dist = np.abs(frame - np.array(COLORS[s.color])).sum(1)
        assert (dist < 30).mean() > 0.08, s  # a big object of that colour is on screen


def test_questions_pass_checker_and_use_vocabulary(stream):
    vocab = set(vocabulary())
    qs = questions(stream, 200, seed=1)
    assert len(qs) >= 150
    assert {q.kind for q in qs} == set(KINDS)
    for q in qs:
        assert check_answerable(stream, q), q
        assert q.answer in vocab
        assert all(w in vocab for w in q.text.split()), q.text
        assert 0 < q.ask_at <= 300
        assert q.evidence and all(0 <= a < b <= q.ask_at for a, b in q.evidence)


def test_answers_follow_from_the_frames_before_ask_at(stream):
    """Recomputing on a frame-by-frame view of [0, ask_at) gives the stored answer, and the
    evidence frames alone determine it too."""
    for q in questions(stream, 60, seed=2):
        view = [(f, stream.scene_of(f)) for f in range(q.ask_at)]
        ans, _ = answer_on_view(view, q.kind, dict(q.params))
        assert ans == q.answer
        if q.kind in ("attribute", "reverse", "now"):
            ev = [(f, stream.scene_of(f)) for a, b in q.evidence for f in range(a, b)]
            assert answer_on_view(ev, q.kind, dict(q.params))[0] == q.answer


def test_checker_rejects_ambiguous_and_wrong_questions():
    s = generate_stream(400, seed=11, config=replace(WorldConfig(), fixed_colors=False))
    # a shape that appeared in two different colours: "what color was the X?" is ambiguous
    seen: dict[str, set[str]] = {}
    for sc in s.scenes:
        seen.setdefault(sc.shape, set()).add(sc.color)
    shape = next(sh for sh, cols in seen.items() if len(cols) > 1)
    assert make_question(s, "attribute", {"shape": shape}, len(s.frames)) is None
    sc = next(x for x in s.scenes if x.shape == shape)
    forged = Question(f"what color was the {shape} ?", sc.color, "attribute", len(s.frames),
                      ((sc.start, sc.end),), (("shape", shape),))  # fmt: skip
    assert not check_answerable(s, forged)
    # unanswerable yet: asked before the object was ever shown
    later = next(x for x in s.scenes if x.start > 0)
    q = Question(f"what color was the {later.shape} ?", later.color, "attribute", later.start, (), (("shape", later.shape),))
    if all(x.shape != later.shape for x in s.scenes if x.start < later.start):
        assert not check_answerable(s, q)
    # a good question, then a wrong answer / wrong evidence / wrong text
    good = questions(generate_stream(200, seed=12), 20, seed=0)[0]
    s2 = generate_stream(200, seed=12)
    assert check_answerable(s2, good)
    wrong = "red" if good.answer != "red" else "blue"
    assert not check_answerable(s2, replace(good, answer=wrong))
    assert not check_answerable(s2, replace(good, evidence=((0, 1),) if good.evidence != ((0, 1),) else ((0, 2),)))
    assert not check_answerable(s2, replace(good, text=good.text + " ?"))


def test_mp4_round_trip(tmp_path):
    s = generate_stream(24, seed=2)
    path = write_mp4(s, tmp_path / "s.mp4")
    frames = read_mp4(path)
    assert frames.shape == s.frames.shape
    err = np.abs(frames.astype(int) - s.frames.astype(int))
    assert err.mean() < 6
    for sc in s.scenes:  # the object's colour survives at its centre
        t = sc.start
        c = s.config.frame_size // 2
        assert np.abs(frames[t, c - 1 : c + 1, c - 1 : c + 1].reshape(-1, 3).mean(0) - s.frames[t, c - 1 : c + 1, c - 1 : c + 1].reshape(-1, 3).mean(0)).max() < 40
