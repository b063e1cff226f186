"""benchmarks.stop_rule_table pools densify_bench --auto results over scene sets."""

import json

from benchmarks.stop_rule_table import files_of, main


def _record(first_seed, queries, absrel, ref_absrel, stop):
    scenes = []
    for i, (q, a, r, s) in enumerate(zip(queries, absrel, ref_absrel, stop)):
        scenes.append({"seed": first_seed + i, "results": {"3072": {"adaptive+edge": {
            "absrel": r, "edge_absrel": 2 * r, "delta1": 0.99}}},
            "auto": {"queries": q, "absrel": a, "edge_absrel": 2 * a, "delta1": 0.98, "stop": s}})
    loss = sum(absrel) / len(absrel) - sum(ref_absrel) / len(ref_absrel)
    run = {"per_scene": scenes, "auto": {"absrel_loss": loss}}
    return {"scenes": [first_seed + i for i in range(len(queries))], "options": {"auto": {"round": 256}},
            "presets": {"iid": run}}


def test_pools_scene_sets_of_one_tag(tmp_path, capsys):
    (tmp_path / "densify_2026-12-03_r256.json").write_text(json.dumps(
        _record(100, [1280, 4096], [0.03, 0.02], [0.02, 0.02], ["shared", "cap"])))
    (tmp_path / "densify_2026-12-03_r256_s200.json").write_text(json.dumps(
        _record(200, [1280, 1280], [0.04, 0.04], [0.03, 0.03], ["shared", "shared"])))
    (tmp_path / "densify_2026-12-03_r2560.json").write_text("{}")  # another tag: not pooled
    assert [p.name for p in files_of(tmp_path, "2026-12-03", "r256")] == [
        "densify_2026-12-03_r256.json", "densify_2026-12-03_r256_s200.json"]
    assert main(["r256", "--results", str(tmp_path)]) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| r256")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].split("|")[1:-1]]
    assert cells[2] == "4 (100, 200)" and cells[3] == "iid"
    assert cells[4] == "1984 (1280-4096)"                 # mean of 1280, 4096, 1280, 1280
    assert cells[5] == "0.0325 (+0.0075)"                 # 0.0325 vs the former default's 0.025
    assert cells[8] == "+0.0100"                          # set 200 loses the most
    assert cells[9] == "cap 1, shared 3"


def test_unknown_tag_is_an_error(tmp_path):
    assert main(["nothing", "--results", str(tmp_path)]) == 2
