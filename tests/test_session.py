import dataclasses
import json
import os
import pathlib
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from editr2 import session as session_mod
from editr2.session import Session, SessionFormatError, Turn


def rgb(width=8, height=6, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_session(num_turns=3, latents=True):
    s = Session(rgb(seed=0), rules=("keep it red",), source_latents=torch.randn(1, 4, 3) if latents else None,
                meta={"task": "cm"})
    for i in range(num_turns):
        s = s.append(Turn(f"instr {i}", rgb(seed=i + 1), f"intent {i}", reasoning=f"why {i}", seed=i,
                          timings={"total": 0.5 + i}, latents=torch.randn(1, 4, 3) if latents else None,
                          meta={"i": i}))
    return s


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


# ----------------------------------------------------------------------------------------------------------------------
# Round trip (property based)

texts = st.text(max_size=20)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
metas = st.dictionaries(texts, json_values, max_size=3)


@st.composite
def latents(draw):
    if draw(st.booleans()):
        return None
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return torch.randn(1, draw(st.integers(1, 5)), draw(st.integers(1, 4)), generator=gen).to(dtype)


@st.composite
def sessions(draw):
    width, height = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    image = lambda: rgb(width, height, draw(st.integers(0, 10**6)))  # noqa: E731
    turns = [
        Turn(
            instruction=draw(texts),
            image=image() if draw(st.booleans()) else None,
            intent=draw(texts),
            reasoning=draw(st.sampled_from(["", "thinking\nhard <b>"]) | texts),
            fallback_reason=draw(st.none() | st.sampled_from(["no_end_tag", "empty", "too_long"])),
            seed=draw(st.none() | st.integers(-(2**63), 2**64)),
            timings=draw(st.dictionaries(texts, finite, max_size=3)),
            latents=draw(latents()),
            meta=draw(metas),
        )
        for _ in range(draw(st.integers(0, 4)))
    ]
    return Session(image(), tuple(turns), tuple(draw(st.lists(texts, max_size=3))), draw(latents()), draw(metas))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
@pytest.mark.slow
def test_round_trip(session):
    with tempfile.TemporaryDirectory() as d:
        path = session.save(pathlib.Path(d) / "s")
        loaded = Session.load(path)
        assert loaded == session
        for a, b in zip([session.source_latents] + [t.latents for t in session.turns],
                        [loaded.source_latents] + [t.latents for t in loaded.turns]):
            if a is not None:
                assert b.dtype == a.dtype and torch.equal(bits(a), bits(b))  # bit exact
        # saving again over an existing session replaces it and leaves no temporary siblings
        session.truncate(0).save(path)
        assert Session.load(path).num_turns == 0
        assert sorted(os.listdir(d)) == ["s"]


def test_save_layout(tmp_path):
    s = make_session(2)
    s.save(tmp_path / "s")
    assert sorted(os.listdir(tmp_path / "s")) == ["latents.safetensors", "session.json", "source.png", "turn_01.png",
                                                  "turn_02.png"]
    doc = json.loads((tmp_path / "s" / "session.json").read_text())
    assert doc["format_version"] == 1 and doc["turns"][1]["image"] == "turn_02.png"
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "s" / "latents.safetensors")) == ["source", "turn_01", "turn_02"]
    make_session(1, latents=False).save(tmp_path / "s")
    assert not (tmp_path / "s" / "latents.safetensors").exists()


def test_shared_latent_tensor_saves(tmp_path):
    t = torch.randn(1, 2, 2)
    s = Session(rgb(), source_latents=t).append(Turn("a", rgb(seed=1), "a", latents=t))
    assert Session.load(s.save(tmp_path / "s")) == s


# ----------------------------------------------------------------------------------------------------------------------
# Atomic save


def test_crash_mid_save_keeps_previous_session(tmp_path, monkeypatch):
    old = make_session(2)
    old.save(tmp_path / "s")
    calls = []

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(path, data)

    real_write = session_mod._fsync_write
    monkeypatch.setattr(session_mod, "_fsync_write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        make_session(3).save(tmp_path / "s")
    assert Session.load(tmp_path / "s") == old
    assert os.listdir(tmp_path) == ["s"]  # the temporary directory was removed


def test_crash_during_swap_restores_previous_session(tmp_path, monkeypatch):
    old = make_session(1)
    old.save(tmp_path / "s")
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(session_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        make_session(2).save(tmp_path / "s")
    monkeypatch.undo()
    assert Session.load(tmp_path / "s") == old
    assert os.listdir(tmp_path) == ["s"]


def test_save_refuses_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a saved session"):
        make_session(1).save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    make_session(1).save(tmp_path / "empty_ok")  # new directory
    (tmp_path / "empty").mkdir()
    make_session(1).save(tmp_path / "empty")  # empty existing directory


def test_load_missing_directory_names_aside_copy(tmp_path):
    make_session(1).save(tmp_path / "s")
    os.replace(tmp_path / "s", tmp_path / ".s.old-1234abcd")  # as if a crash hit between the two renames
    with pytest.raises(FileNotFoundError, match=r"\.s\.old-1234abcd"):
        Session.load(tmp_path / "s")


# ----------------------------------------------------------------------------------------------------------------------
# Corrupt input


@pytest.fixture
def saved(tmp_path):
    make_session(3).save(tmp_path / "s")
    return tmp_path / "s"


def edit_json(path, fn):
    doc = json.loads((path / "session.json").read_text())
    fn(doc)
    (path / "session.json").write_text(json.dumps(doc))


def test_truncated_json(saved):
    text = (saved / "session.json").read_text()
    (saved / "session.json").write_text(text[: len(text) // 2])
    with pytest.raises(SessionFormatError, match=r"session\.json: not valid JSON"):
        Session.load(saved)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["turns"][1].__setitem__("intent", 5), r"session\.json: turns\[1\]\.intent: expected str, got int"),
        (lambda d: d["turns"][0].pop("reasoning"), r"turns\[0\]\.reasoning: missing field"),
        (lambda d: d.pop("format_version"), r"format_version: missing field"),
        (lambda d: d.__setitem__("format_version", 99), r"format_version: 99 is newer"),
        (lambda d: d["turns"][2].__setitem__("seed", True), r"turns\[2\]\.seed: expected int or null, got bool"),
        (lambda d: d["turns"][2].__setitem__("timings", {"total": "1"}), r"turns\[2\]\.timings\.total: expected float"),
        (lambda d: d.__setitem__("rules", ["ok", 3]), r"rules\[1\]: expected str, got int"),
        (lambda d: d.__setitem__("size", [8]), r"size: expected \[width, height\]"),
        (lambda d: d["turns"].__setitem__(0, "x"), r"turns\[0\]: expected object, got str"),
        (lambda d: d["turns"][0].__setitem__("image", "../x.png"), r"turns\[0\]\.image: image name"),
        (lambda d: d["turns"][0].__setitem__("latents", "nope"), r"latents\.safetensors: turns\[0\]\.latents: missing"),
    ],
)
def test_bad_fields(saved, mutate, message):
    edit_json(saved, mutate)
    with pytest.raises(SessionFormatError, match=message):
        Session.load(saved)


def test_not_an_object(saved):
    (saved / "session.json").write_text("[1, 2]")
    with pytest.raises(SessionFormatError, match="expected a JSON object"):
        Session.load(saved)


def test_missing_png(saved):
    os.remove(saved / "turn_02.png")
    with pytest.raises(SessionFormatError, match=r"turn_02\.png: turns\[1\]\.image: missing image file"):
        Session.load(saved)


def test_image_size_mismatch(saved):
    rgb(5, 5).save(saved / "turn_01.png")
    with pytest.raises(SessionFormatError, match=r"turn_01\.png: turns\[0\]\.image: image size \(5, 5\)"):
        Session.load(saved)


def test_non_rgb_and_garbage_png(saved):
    rgb().convert("RGBA").save(saved / "source.png")
    with pytest.raises(SessionFormatError, match=r"source\.png: source_image: expected an RGB image, got mode 'RGBA'"):
        Session.load(saved)
    (saved / "source.png").write_bytes(b"\x89PNG\r\n garbage")
    with pytest.raises(SessionFormatError, match=r"source\.png: source_image: unreadable image"):
        Session.load(saved)


def test_bad_latents_file(saved):
    (saved / "latents.safetensors").write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(SessionFormatError, match=r"latents\.safetensors: unreadable"):
        Session.load(saved)
    os.remove(saved / "latents.safetensors")
    with pytest.raises(SessionFormatError, match=r"latents\.safetensors: missing latents file"):
        Session.load(saved)


def test_error_is_value_error_with_fields(saved):
    edit_json(saved, lambda d: d["turns"][1].__setitem__("intent", 5))
    with pytest.raises(ValueError) as info:
        Session.load(saved)
    assert info.value.file.endswith("session.json") and info.value.field == "turns[1].intent"


# ----------------------------------------------------------------------------------------------------------------------
# Value semantics and validation


def test_branches_share_history_and_never_mutate():
    base = make_session(2)
    before = list(base.turns)
    left = base.append(Turn("left", rgb(seed=10), "left"))
    right = base.append(Turn("right", rgb(seed=11), "right"))
    assert base.turns == tuple(before) and base.num_turns == 2
    assert all(a is b for a, b in zip(left.turns[:2], right.turns[:2]))  # shared Turn objects
    assert left.source_image is base.source_image and left.source_latents is base.source_latents
    assert left.instructions[-1] == "left" and right.instructions[-1] == "right"
    undone = left.truncate(1)
    assert undone.num_turns == 1 and left.num_turns == 3
    ruled = base.with_rule("only red")
    assert ruled.rules == ("keep it red", "only red") and base.rules == ("keep it red",)
    assert ruled.with_rule("only red") is ruled
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.turns = ()
    with pytest.raises(ValueError, match=r"num_turns must be in \[0, 2\]"):
        base.truncate(3)


def test_views():
    s = make_session(2)
    assert s.size == (8, 6) and s.intents == ["intent 0", "intent 1"]
    assert s.images[0] is s.source_image and s.images[2] is s.turns[1].image
    assert s.current_image is s.turns[1].image and s.current_latents is s.turns[1].latents
    text_only = s.append(Turn("describe it", None, "describe it"))
    assert text_only.current_image is s.turns[1].image and text_only.images[-1] is None
    assert Session(rgb()).current_latents is None and Session(rgb()).current_image.size == (8, 6)


def test_validation_errors():
    with pytest.raises(ValueError, match=r"mode 'RGBA'; pass image\.convert\('RGB'\)"):
        Session(rgb().convert("RGBA"))
    with pytest.raises(ValueError, match=r"Turn\.image.*mode 'L'"):
        Turn("a", rgb().convert("L"), "a")
    with pytest.raises(ValueError, match=r"turns\[0\]\.image has size \(4, 4\)"):
        Session(rgb()).append(Turn("a", rgb(4, 4), "a"))
    with pytest.raises(ValueError, match="Turn.seed: expected int, got bool"):
        Turn("a", None, "a", seed=True)
    with pytest.raises(ValueError, match="finite"):
        Turn("a", None, "a", timings={"total": float("nan")})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        Turn("a", None, "a", meta={"x": object()})
    with pytest.raises(ValueError, match="Turn.intent: expected str, got NoneType"):
        Turn("a", None, None)


# ----------------------------------------------------------------------------------------------------------------------
# Killed saves, foreign files, bad latents


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs (the test also stops the cleanup it would skip)."""


def killed_save(session, path, monkeypatch, between_renames=False):
    """Save `session` to `path` and "kill" it: mid-write, or between the two renames of the swap."""
    real_replace, real_write = os.replace, session_mod._fsync_write
    renames = []

    def replace(src, dst):
        renames.append(src)
        if len(renames) > 1:
            raise Killed
        real_replace(src, dst)

    def write(p, data):
        raise Killed

    monkeypatch.setattr(session_mod.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
    if between_renames:
        monkeypatch.setattr(session_mod.os, "replace", replace)
    else:
        monkeypatch.setattr(session_mod, "_fsync_write", write)
    with pytest.raises(Killed):
        session.save(path)
    monkeypatch.undo()
    assert os.replace is real_replace and session_mod._fsync_write is real_write


def test_killed_saves_leave_nothing_behind(tmp_path, monkeypatch):
    make_session(1).save(tmp_path / "s")
    for _ in range(3):
        killed_save(make_session(2), tmp_path / "s", monkeypatch)
    assert len([p for p in os.listdir(tmp_path) if p.startswith(".s.tmp-")]) == 3
    assert Session.load(tmp_path / "s").num_turns == 1  # the old session is intact ...
    assert os.listdir(tmp_path) == ["s"]  # ... and loading it removed the leftovers
    killed_save(make_session(2), tmp_path / "s", monkeypatch)
    make_session(3).save(tmp_path / "s")  # the next save removes them too
    assert os.listdir(tmp_path) == ["s"]
    killed_save(make_session(2), tmp_path / "t", monkeypatch)  # another session's leftovers are its own
    make_session(3).save(tmp_path / "s")
    assert sorted(p.split("-")[0] for p in os.listdir(tmp_path)) == [".t.tmp", "s"]


def test_load_hint_names_the_latest_aside_copy(tmp_path, monkeypatch):
    import uuid

    # the aside copies' random suffixes sort the stale one last
    suffixes = {3: "f" * 32, 6: "0" * 32}
    calls = iter(range(1, 100))
    real_uuid4 = uuid.uuid4

    def uuid4():
        n = next(calls)
        return uuid.UUID(suffixes.get(n, f"{n:08x}" + "1" * 24))

    s = tmp_path / "s"
    monkeypatch.setattr(session_mod.uuid, "uuid4", uuid4)
    make_session(1).save(s)  # uuid 1
    killed_save(make_session(2), s, monkeypatch, between_renames=True)  # uuids 2, 3: turn-1 session aside
    monkeypatch.setattr(session_mod.uuid, "uuid4", uuid4)
    make_session(3).save(s)  # uuid 4
    killed_save(make_session(0), s, monkeypatch, between_renames=True)  # uuids 5, 6: turn-3 session aside
    assert session_mod.uuid.uuid4 is real_uuid4
    with pytest.raises(FileNotFoundError, match="interrupted save") as info:
        Session.load(s)
    aside = pathlib.Path(str(info.value).split(" at ")[-1].split(";")[0])
    assert Session.load(aside).num_turns == 3  # the version the last save replaced, not an older one
    assert len(list(tmp_path.glob(".s.old-*"))) == 1  # the save of the turn-3 session removed the older copy


def test_symlinked_files_out_of_the_folder_are_refused(saved, tmp_path):
    outside = tmp_path / "elsewhere.png"
    rgb(seed=99).save(outside)
    os.remove(saved / "turn_01.png")
    os.symlink(outside, saved / "turn_01.png")
    with pytest.raises(SessionFormatError, match=r"turn_01\.png: turns\[0\]\.image: a symbolic link .*outside"):
        Session.load(saved)
    os.remove(saved / "turn_01.png")
    os.symlink("turn_02.png", saved / "turn_01.png")  # a link inside the folder is fine
    assert Session.load(saved).turns[0].image.tobytes() == Session.load(saved).turns[1].image.tobytes()
    os.replace(saved / "latents.safetensors", tmp_path / "latents.safetensors")
    os.symlink(tmp_path / "latents.safetensors", saved / "latents.safetensors")
    with pytest.raises(SessionFormatError, match=r"latents\.safetensors: a symbolic link"):
        Session.load(saved)


def rewrite_latents(path, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "latents.safetensors")
    fn(tensors)
    save_file(tensors, path / "latents.safetensors")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.__setitem__("turn_02", t["turn_02"].half()), r"turns\[1\]\.latents: the latents of turn 2 are "
         r"float16 \(1, 4, 3\), but session\.json records"),
        (lambda t: t.__setitem__("source", t["source"][:, :2]), r"source_latents: the latents of the source are "
         r"float32 \(1, 2, 3\)"),
    ],
)
def test_latents_of_another_dtype_or_shape_are_refused(saved, mutate, message):
    rewrite_latents(saved, mutate)
    with pytest.raises(SessionFormatError, match=message):
        Session.load(saved)


def test_non_finite_latents_are_refused_on_load_and_save(saved):
    rewrite_latents(saved, lambda t: t["turn_03"].__setitem__((0, 1, 2), float("nan")))
    with pytest.raises(SessionFormatError, match=r"turns\[2\]\.latents: the latents of turn 3: non-finite"):
        Session.load(saved)
    bad = make_session(1)
    bad = bad.append(dataclasses.replace(bad.turns[0], latents=torch.full((1, 4, 3), float("inf"))))
    with pytest.raises(ValueError, match=r"Cannot save the latents of turn 2: non-finite"):
        bad.save(saved.parent / "bad")
    assert not (saved.parent / "bad").exists()


def test_latents_without_a_recorded_layout_are_still_checked(saved):
    # files written before session.json recorded the latents' dtype and shape load, with the structural checks
    edit_json(saved, lambda d: d.pop("latents"))
    assert Session.load(saved) == Session.load(saved)
    rewrite_latents(saved, lambda t: t.__setitem__("turn_01", torch.zeros(4, 3, dtype=torch.int32)))
    with pytest.raises(SessionFormatError, match=r"turns\[0\]\.latents: the latents of turn 1: expected shape"):
        Session.load(saved)
