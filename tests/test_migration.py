"""`qbench migrate`: records stored under the old key (the scheme's name and description
inside it) are re-keyed to today's, atomically and idempotently; what cannot be read is
quarantined with its reason."""
import json

from qbench.cli import main
from qbench.migration import migrate_store
from qbench.paths import REPO_ROOT
from qbench.quant import get_scheme
from qbench.results import ResultStore, cell_key

COMMITTED = REPO_ROOT / "results" / "records"


def committed_records(n=3):
    """A few committed records (in today's form: their keys are today's planner's, see
    test_record_keys), sorted for a fixed choice."""
    paths = sorted(COMMITTED.glob("*.json"))[:n]
    return [json.loads(p.read_text()) for p in paths]


def old_form(record, description=None):
    """The record as it was stored before the key lost the prose."""
    scheme = json.loads(record["config"]["scheme"])
    scheme["name"] = record["scheme"]
    scheme["description"] = description or get_scheme(record["scheme"]).description
    config = {**record["config"], "scheme": json.dumps(scheme, sort_keys=True, separators=(",", ":"))}
    import hashlib

    config["scheme_hash"] = hashlib.sha256(config["scheme"].encode()).hexdigest()[:16]
    old = {k: v for k, v in record.items() if k != "migrated_from"}
    return {**old, "config": config, "key": cell_key(config)}


def store_with(tmp_path, records):
    store = ResultStore(tmp_path)
    store.records_dir.mkdir(parents=True)
    for record in records:
        store.put(record)
    return store


def test_old_records_get_todays_keys_and_keep_the_old_one(tmp_path, capsys):
    today = committed_records()
    old = [old_form(r) for r in today]
    store = store_with(tmp_path, old)
    assert main(["migrate", "--results", str(tmp_path)]) == 0
    assert "3 record(s) migrated, 0 already current (0 given their facts), 0 quarantined" in capsys.readouterr().out
    for before, expected in zip(old, today):
        migrated = store.get(expected["key"])
        assert migrated is not None and not store.path(before["key"]).exists()
        assert migrated["migrated_from"] == before["key"]
        # only the key, config.scheme and config.scheme_hash moved; metrics and the rest are as stored
        assert {k: v for k, v in migrated.items() if k != "migrated_from"} == \
            {k: v for k, v in expected.items() if k != "migrated_from"}
        assert migrated["metrics"] == before["metrics"]
    files = {p.name: p.read_text() for p in store.records_dir.glob("*.json")}
    again = migrate_store(tmp_path)  # idempotent
    assert (len(again.migrated), again.current, again.quarantined) == (0, 3, [])
    assert files == {p.name: p.read_text() for p in store.records_dir.glob("*.json")}


def test_a_run_killed_between_write_and_remove_is_finished_by_the_next(tmp_path):
    record = committed_records(1)[0]
    old = old_form(record)
    store = store_with(tmp_path, [old, {**record, "migrated_from": old["key"]}])  # new written, old not yet removed
    report = migrate_store(tmp_path)
    assert report.migrated == [(old["key"], record["key"])] and report.quarantined == []
    assert sorted(p.stem for p in store.records_dir.glob("*.json")) == [record["key"]]


def test_what_cannot_be_migrated_is_quarantined_with_a_reason(tmp_path):
    first, second = committed_records(2)
    old = old_form(first)
    # same computation under another name: it would land on the first one's new key
    twin = old_form({**first, "scheme": second["scheme"],
                     "metrics": {**first["metrics"], "twin_only": 1.0}}, description="a twin")
    mismatched = {**old_form(second), "key": "0" * 20}
    store = store_with(tmp_path, [old, twin, mismatched])
    (store.records_dir / "garbage.json").write_text("{not json")
    report = migrate_store(tmp_path)
    reasons = dict(report.quarantined)
    assert reasons["garbage.json"].startswith("not valid JSON")
    assert reasons[f"{'0' * 20}.json"] == "its key does not match its content"
    held = [old["key"], twin["key"]]
    assert sum("is held by another record" in reasons.get(f"{k}.json", "") for k in held) == 1
    assert len(report.migrated) == 1 and len(store.quarantined()) == 3
    assert [p.stem for p in store.records_dir.glob("*.json")] == [first["key"]]


def test_listings_do_not_depend_on_the_keys(tmp_path):
    today = committed_records(6)
    new_store = store_with(tmp_path / "new", today)
    old_store = store_with(tmp_path / "old", [old_form(r) for r in today])
    identity = [(r["model"], r["scheme"], r["task"], r["protocol"], r.get("calibration_seed"))
                for r in new_store.records()]
    assert identity == [(r["model"], r["scheme"], r["task"], r["protocol"], r.get("calibration_seed"))
                        for r in old_store.records()]


def test_migrate_refuses_a_path_that_is_not_a_store_and_a_store_it_cannot_write(tmp_path, capsys):
    assert main(["migrate", "--results", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no result store" in err[0]
    assert not (tmp_path / "typo").exists()  # nothing created on a typo
    store = ResultStore(tmp_path / "store")
    store.records_dir.mkdir(parents=True)
    (store.records_dir / ".locks").write_text("a file where the lock folder belongs")
    assert main(["migrate", "--results", str(store.root)]) == 5
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_records_without_facts_get_the_facts_the_report_derives(tmp_path):
    """A record in today's form but without `facts` gets them (key and file name unchanged,
    nothing else touched), equal to what the report derives for it; a model outside the zoo
    keeps none; a second run changes nothing."""
    from qbench.report.facts import model_facts, scheme_facts
    from qbench.zoo import read_zoo

    zoo = read_zoo()
    today = committed_records()
    bare = [{k: v for k, v in r.items() if k != "facts"} for r in today]
    outside = {**bare[0], "model": "not-in-the-zoo"}
    outside["config"] = {**outside["config"], "model": {**outside["config"]["model"], "name": "not-in-the-zoo"}}
    outside["key"] = cell_key(outside["config"])
    store = store_with(tmp_path, bare + [outside])
    report = migrate_store(tmp_path, zoo)
    assert (len(report.migrated), report.current, report.facts_added, report.quarantined) == (0, 4, 3, [])
    for before in bare:
        after = store.get(before["key"])
        assert {k: v for k, v in after.items() if k != "facts"} == before
        assert after["facts"] == {"model": model_facts(before, zoo), "scheme": scheme_facts(before)}
    assert "facts" not in store.get(outside["key"])
    files = {p.name: p.read_text() for p in store.records_dir.glob("*.json")}
    assert migrate_store(tmp_path, zoo).facts_added == 0
    assert files == {p.name: p.read_text() for p in store.records_dir.glob("*.json")}
