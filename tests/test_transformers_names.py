"""benchmarks.transformers_names: the names a vLLM build imports from transformers, checked against the
installed transformers (how the Pixtral mismatch on the GPU host was pinned to transformers >= 5.17)."""

from benchmarks.transformers_names import check, imported_names, main


def _sources(tmp_path):
    models = tmp_path / "vllm" / "model_executor" / "models"
    models.mkdir(parents=True)
    (models / "pixtral.py").write_text(
        "import transformers\n"
        "from transformers import PretrainedConfig\n"
        "from transformers.models.pixtral.modeling_pixtral import PixtralVisionRotaryEmbedding, NoSuchHelper\n"
        "from transformers.models import pixtral\n"
        "from .other import x\n")
    (models / "gone.py").write_text("from transformers.models.no_such_model.modeling import Thing\n")
    (models / "broken.py").write_text("def (:\n")  # not Python: skipped
    return tmp_path / "vllm"


def test_the_names_imported_from_transformers_are_found(tmp_path):
    names = imported_names(_sources(tmp_path))
    assert set(names) == {("transformers", "PretrainedConfig"),
                          ("transformers.models.pixtral.modeling_pixtral", "PixtralVisionRotaryEmbedding"),
                          ("transformers.models.pixtral.modeling_pixtral", "NoSuchHelper"),
                          ("transformers.models", "pixtral"),
                          ("transformers.models.no_such_model.modeling", "Thing")}
    assert names[("transformers", "PretrainedConfig")] == ["model_executor/models/pixtral.py"]
    assert set(imported_names(_sources(tmp_path / "b"), only=["gone"])) == {
        ("transformers.models.no_such_model.modeling", "Thing")}


def test_missing_names_and_modules_are_reported_and_fail_the_check(tmp_path, capsys):
    report = check(imported_names(_sources(tmp_path)))
    missing = {(m["name"], m["why"]) for m in report["missing"]}
    assert missing == {("NoSuchHelper", "no such name"), ("Thing", "no such module")}
    assert report["imports"] == 5 and report["transformers"]
    assert main([str(tmp_path / "vllm")]) == 1 and '"NoSuchHelper"' in capsys.readouterr().out
    assert main([str(tmp_path / "vllm"), "--only", "nothing-matches"]) == 0
    capsys.readouterr()
    assert main([str(tmp_path / "vllm"), "--brief"]) == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith("vllm's imports missing from transformers ") and line.endswith(
        "transformers.models.no_such_model.modeling.Thing, transformers.models.pixtral.modeling_pixtral.NoSuchHelper")
