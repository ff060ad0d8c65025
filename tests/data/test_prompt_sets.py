"""Prompt-set loaders on tiny files in each official format."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spobench.core import catalog
from spobench.data import prompt_sets as ps
from spobench.core.errors import InputError


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "no-hps"))
    return tmp_path / "data"


# -- Pick-a-Pic ---------------------------------------------------------------------------------

def write_pickapic(path, captions):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"caption": captions, "jpg_0": [b"\xff\xd8"] * len(captions), "label_0": [0.5] * len(captions)})
    pq.write_table(table, path)
    return path


def test_pickapic_dedupes_in_order_and_records_version(data):
    write_pickapic(data / "pickapic" / "validation_unique-00000-of-00001-c7e5.parquet",
                   ["a cat", " a dog ", "a cat", "", "a fox", "a dog"])
    got = ps.pickapic_validation_unique()
    assert list(got) == ["a cat", "a dog", "a fox"] and isinstance(got, list)
    assert got.name == "pickapic-validation-unique" and got.source.endswith("c7e5.parquet")
    assert got.version.startswith("pickapic-validation-unique/1+") and len(got.version.split("+")[1]) == 12
    assert got.official_size == 500 and not got.is_official_size
    assert got.info()["n"] == 3
    # the registered prompt set is the same loader, callable with no argument (as the CLI calls it)
    assert catalog.PROMPT_SETS.get("pickapic-validation-unique")() == got
    assert catalog.PROMPT_SETS.entry("pickapic-validation-unique").status == "ready"


def test_pickapic_shards_hub_layout_and_explicit_path(tmp_path):
    folder = tmp_path / "dl"
    write_pickapic(folder / "data" / "validation_unique-00001-of-00002.parquet", ["c", "a"])
    write_pickapic(folder / "data" / "validation_unique-00000-of-00002.parquet", ["a", "b"])
    write_pickapic(folder / "data" / "train-00000-of-00002.parquet", ["not me"])
    assert list(ps.pickapic_validation_unique(folder)) == ["a", "b", "c"]
    one = ps.pickapic_validation_unique(folder / "data" / "validation_unique-00001-of-00002.parquet")
    assert list(one) == ["c", "a"]


def test_pickapic_version_follows_content(tmp_path):
    a = ps.pickapic_validation_unique(write_pickapic(tmp_path / "1" / "v.parquet", ["x", "y"]))
    b = ps.pickapic_validation_unique(write_pickapic(tmp_path / "2" / "v.parquet", ["x", "y", "x"]))
    c = ps.pickapic_validation_unique(write_pickapic(tmp_path / "3" / "v.parquet", ["y", "x"]))
    assert a.version == b.version != c.version


def test_pickapic_missing_names_file_and_hub_id(data):
    with pytest.raises(InputError, match=r"pickapic/validation_unique\*\.parquet.*not found.*yuvalkirstain/pickapic_v1"):
        ps.pickapic_validation_unique()
    with pytest.raises(InputError, match="yuvalkirstain/pickapic_v1"):
        catalog.PROMPT_SETS.get("pickapic-validation-unique")()


def test_pickapic_bad_files(tmp_path):
    f = tmp_path / "validation_unique.parquet"
    pq.write_table(pa.table({"prompt": ["a"]}), f)
    with pytest.raises(InputError, match=r"validation_unique.parquet: no 'caption' column \(columns: prompt\)"):
        ps.pickapic_validation_unique(f)
    pq.write_table(pa.table({"caption": ["a", None]}), f)
    with pytest.raises(InputError, match="row 1: caption is null"):
        ps.pickapic_validation_unique(f)
    f.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot be read as parquet"):
        ps.pickapic_validation_unique(f)


# -- HPSv2 --------------------------------------------------------------------------------------

def write_hpsv2(folder, n=3, skip=()):
    folder.mkdir(parents=True, exist_ok=True)
    for style in ps.HPSV2_STYLES:
        if style not in skip:
            (folder / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(n)]))
    return folder


def test_hpsv2_concatenates_styles_with_metadata(data):
    write_hpsv2(data / "hpsv2" / "benchmark")
    got = ps.hpsv2_benchmark()
    assert len(got) == 12 and got[0] == "anime prompt 0" and got[-1] == "photo prompt 2"
    assert got.metadata[4] == {"style": "concept-art", "style_index": 1}
    assert [m["style"] for m in got.metadata[::3]] == list(ps.HPSV2_STYLES)
    assert got.official_size == 3200 and not got.is_official_size
    assert catalog.PROMPT_SETS.get("hpsv2-benchmark")() == got
    photo = ps.hpsv2_benchmark(styles=["photo"])
    assert list(photo) == ["photo prompt 0", "photo prompt 1", "photo prompt 2"]
    assert photo.version.endswith("/styles=photo") and photo.version != got.version
    with pytest.raises(InputError, match="unknown style"):
        ps.hpsv2_benchmark(styles=["cartoon"])


def test_hpsv2_explicit_folder_file_and_hpsv2_cache(tmp_path, monkeypatch):
    folder = write_hpsv2(tmp_path / "x" / "benchmark")
    assert len(ps.hpsv2_benchmark(tmp_path / "x")) == 12  # parent of benchmark/
    assert len(ps.hpsv2_benchmark(folder / "photo.json")) == 12  # one of the files
    monkeypatch.setenv("SPOBENCH_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "hps"))
    write_hpsv2(tmp_path / "hps" / "datasets" / "benchmark")  # where the hpsv2 package downloads them
    assert len(ps.hpsv2_benchmark()) == 12


def test_hpsv2_missing_and_bad(data):
    write_hpsv2(data / "hpsv2" / "benchmark", skip=("paintings",))
    with pytest.raises(InputError, match=r"benchmark/paintings.json not found.*zhwang/HPDv2"):
        ps.hpsv2_benchmark()
    (data / "hpsv2" / "benchmark" / "paintings.json").write_text('{"a": 1}')
    with pytest.raises(InputError, match="paintings.json: expected a JSON list"):
        ps.hpsv2_benchmark()
    (data / "hpsv2" / "benchmark" / "paintings.json").write_text('["ok", 3]')
    with pytest.raises(InputError, match=r"paintings.json: item 1: expected a prompt string"):
        ps.hpsv2_benchmark()
    (data / "hpsv2" / "benchmark" / "paintings.json").write_text('[\n"ok",\n')
    with pytest.raises(InputError, match=r"paintings.json:3: invalid JSON"):
        ps.hpsv2_benchmark()


# -- PartiPrompts -------------------------------------------------------------------------------

PARTI = (
    "Prompt\tCategory\tChallenge\tNote\n"
    "bond\tAbstract\tBasic\tBiology-inspired concepts with multiple meanings\n"
    "peace\tAbstract\tBasic\t\n"
    'A robot painted as graffiti on a brick wall. The words "Fly an airplane" are written on the wall.\tOutdoor Scenes\tComplex\t\n'
    '"Hello" written in the sand \tIllustrations\tWriting & Symbols\t\n'
    "peace\tAbstract\tBasic\t\n"
    "\n"
)


def test_partiprompts_raw_tsv_with_quotes_and_metadata(data):
    (data / "partiprompts").mkdir(parents=True)
    (data / "partiprompts" / "PartiPrompts.tsv").write_text(PARTI)
    got = ps.partiprompts()
    assert len(got) == 5  # duplicates kept as published
    assert got[2].endswith('The words "Fly an airplane" are written on the wall.')
    assert got[3] == '"Hello" written in the sand'
    assert got.metadata[0] == {"category": "Abstract", "challenge": "Basic",
                               "note": "Biology-inspired concepts with multiple meanings"}
    assert got.metadata[3]["challenge"] == "Writing & Symbols"
    assert got.official_size == 1632
    assert catalog.PROMPT_SETS.get("partiprompts")() == got
    assert list(ps.partiprompts(data / "partiprompts")) == list(got)  # a folder works too


def test_partiprompts_missing_and_bad(data, tmp_path):
    with pytest.raises(InputError, match=r"partiprompts/PartiPrompts.tsv.*not found.*google-research/parti.*nateraw/parti-prompts"):
        ps.partiprompts()
    f = tmp_path / "p.tsv"
    f.write_text("prompt,category\na,b\n")
    with pytest.raises(InputError, match=r"p.tsv:1: expected the header Prompt / Category / Challenge / Note"):
        ps.partiprompts(f)
    f.write_text("Prompt\tCategory\tChallenge\tNote\na cat\tAnimals\n")
    with pytest.raises(InputError, match=r"p.tsv:2: expected 4 tab-separated columns"):
        ps.partiprompts(f)
    f.write_text("Prompt\tCategory\tChallenge\tNote\n\tAnimals\tBasic\t\n")
    with pytest.raises(InputError, match=r"p.tsv:2: empty prompt"):
        ps.partiprompts(f)


# -- SPO 4k training list -----------------------------------------------------------------------

def test_spo_training_list(data, tmp_path):
    items = [{"caption": "a cat driving a nuke", "trainset_idx": 215221},
             {"caption": 'a sign with "u good?" written on it', "trainset_idx": 268846},
             {"caption": "a cat driving a nuke", "trainset_idx": 7}]
    (data / "spo").mkdir(parents=True)
    (data / "spo" / "4k_training_prompts.json").write_text(json.dumps(items, indent=4))
    got = ps.spo_training_prompts()
    assert list(got) == [i["caption"] for i in items]
    assert [m["trainset_idx"] for m in got.metadata] == [215221, 268846, 7]
    assert got.name == "spo-4k" and got.official_size == 4000
    assert list(ps.spo_training_prompts(data / "spo")) == list(got)
    # the same file reads the same through the generic prompt-file loader
    assert catalog.PROMPT_SETS.get("file")(data / "spo" / "4k_training_prompts.json") == list(got)


def test_spo_training_list_missing_and_bad(data, tmp_path):
    with pytest.raises(InputError, match=r"spo/4k_training_prompts.json not found.*RockeyCoss/SPO"):
        ps.spo_training_prompts()
    f = tmp_path / "l.json"
    for content, msg in [('["a"]', "item 0: expected an object"), ('[{"trainset_idx": 1}]', "item 0: expected an object"),
                         ('[{"caption": "a", "trainset_idx": "7"}]', "trainset_idx must be an integer"),
                         ('[{"caption": " "}]', "item 0: empty caption"), ("[]", "no prompts"),
                         ('{"caption": "a"}', "expected a JSON list")]:
        f.write_text(content)
        with pytest.raises(InputError, match=msg):
            ps.spo_training_prompts(f)


# -- PromptSet ----------------------------------------------------------------------------------

def test_sample_is_seeded_ordered_and_versioned():
    full = ps.PromptSet([f"p{i}" for i in range(50)], "partiprompts", "x.tsv",
                        [{"category": str(i)} for i in range(50)])
    s1, s2, s3 = ps.sample(full, 10, seed=0), ps.sample(full, 10, seed=0), ps.sample(full, 10, seed=1)
    assert list(s1) == list(s2) != list(s3)
    idx = [int(p[1:]) for p in s1]
    assert idx == sorted(idx) and len(set(idx)) == 10
    assert [m["category"] for m in s1.metadata] == [str(i) for i in idx]
    assert s1.version == f"{full.version}/sample10-seed0"
    with pytest.raises(InputError, match="cannot sample 51"):
        ps.sample(full, 51)
    with pytest.raises(ValueError):
        ps.PromptSet(["a"], "x", "y", metadata=[])
    assert "n=50" in repr(full) and full[:2] == ["p0", "p1"]
