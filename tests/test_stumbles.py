"""What a new user tripped on: each is refused at once, naming the problem.

The command-line cases run `shardinfer.cli.main` in this process with `_load_model` replaced by
one that fails the test, so "refused before loading anything" is checked, not timed.
"""

import numpy as np
import pytest

import shardinfer as si
import shardinfer.cli as cli

RULE_AXES = "the rules use the mesh axes 'data', 'model'"


@pytest.mark.parametrize("spec", ["date=2", "foo=2", "foo=1", "data=2,foo=4", {"modle": 8}])
def test_mesh_axis_no_rule_uses_is_refused(spec):
    with pytest.raises(ValueError, match=RULE_AXES) as caught:
        si.make_mesh(spec)
    bad = (spec if isinstance(spec, str) else next(iter(spec))).split(",")[-1].split("=")[0]
    assert repr(bad) in str(caught.value)


def test_the_name_check_comes_before_the_device_count():
    # date=2 on 8 devices would also not multiply out; the typo is the thing to report.
    with pytest.raises(ValueError, match="mesh axis 'date' is not used by the sharding rules"):
        si.make_mesh("date=2")


def test_custom_rules_allow_custom_axis_names():
    rules = si.ShardingRules((("batch", "dp"), ("vocab", "tp"), ("embed", None)))
    assert rules.mesh_axes() == ("dp", "tp")
    assert dict(si.make_mesh("dp=2,tp=4", rules=rules).shape) == {"dp": 2, "tp": 4}
    with pytest.raises(ValueError, match="the rules use the mesh axes 'dp', 'tp'"):
        si.make_mesh("data=8", rules=rules)
    with pytest.raises(ValueError, match="the default mesh puts every device on 'data'"):
        si.make_mesh(rules=rules)


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", fail)


class Loaded(Exception):
    pass


def _refused(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-tokens", "0"], "--max-tokens must be an integer >= 1, got 0"),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
        (["--top-k", "-2"], "--top-k must be an integer >= 0"),
        (["--max-seq-len", "1"], "--max-seq-len must be >= 2, got 1"),
        (["--mesh", "foo=2"], "--mesh foo=2: mesh axis 'foo' is not used by the sharding rules"),
        (["--mesh", "data"], "must look like name=size"),
        (["--host-devices", "0"], "--host-devices must be >= 1, got 0"),
    ],
)
def test_generate_refuses_bad_arguments_before_loading(no_loading, capsys, argv, message):
    err = _refused(capsys, "generate", "--prompt", "hi", *argv)
    assert message in err
    if "--mesh" in argv and "foo=2" in argv:
        assert RULE_AXES in err


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([""], "--prompt is empty"),
        (["   \n"], "--prompt is only whitespace"),
        (["hi", ""], "--prompt #2 is empty"),
    ],
)
@pytest.mark.parametrize("raw", [[], ["--raw"]])
def test_generate_refuses_an_empty_prompt_before_loading(no_loading, capsys, prompts, message, raw):
    argv = [a for p in prompts for a in ("--prompt", p)]
    assert message in _refused(capsys, "generate", *argv, *raw)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
        (["--max-seq-len", "0"], "--max-seq-len must be >= 2, got 0"),
        (["--replicas", "0"], "--replicas must be >= 1, got 0"),
        (["--port", "70000"], "--port must be in 0-65535, got 70000"),
        (["--mesh", "date=2"], "mesh axis 'date' is not used"),
    ],
)
def test_serve_refuses_bad_arguments_before_loading(no_loading, capsys, argv, message):
    assert message in _refused(capsys, "serve", *argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-sizes", "1,x"], "--batch-sizes takes integers separated by commas"),
        (["--prompt-lengths", "0"], "--prompt-lengths values must be >= 1"),
        (["--new-tokens", "1"], "--new-tokens must be >= 2, got 1"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    ],
)
def test_bench_refuses_bad_arguments_before_loading(no_loading, capsys, argv, message):
    assert message in _refused(capsys, "bench", *argv)


def test_convert_refuses_an_unknown_mesh_axis_before_loading(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise AssertionError("loaded before the arguments were checked")

    monkeypatch.setattr(si, "load_model", fail)
    assert RULE_AXES in _refused(capsys, "convert", "src", "dest", "--mesh", "foo=2")


def test_good_arguments_get_to_loading(monkeypatch):
    def loaded(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(cli, "_load_model", loaded)
    argv = ["generate", "--prompt", "hi", "--mesh", "data=2,model=4", "--top-p", "0.9"]
    with pytest.raises(Loaded):
        cli.main(argv)
    with pytest.raises(Loaded):
        cli.main(["bench", "--mesh", "model=-1", "--batch-sizes", "1,8"])


def test_serve_has_no_warmup_flag():
    args = cli._parser().parse_args(["serve", "--no-warmup"])
    assert args.no_warmup is True
    assert cli._parser().parse_args(["serve"]).no_warmup is False


def test_load_model_builds_a_spec_mesh_over_its_own_rules(tiny_llama):
    rules = si.ShardingRules.load()
    renamed = si.ShardingRules(
        tuple((name, {"data": "dp", "model": "tp"}.get(axis, axis)) for name, axis in rules.rules)
    )
    model = si.load_model(tiny_llama, mesh="dp=2,tp=4", rules=renamed)
    assert dict(model.mesh.shape) == {"dp": 2, "tp": 4}
    plain = si.load_model(tiny_llama, mesh="data=2,model=4")
    np.testing.assert_allclose(model.logits([[1, 2, 3]]), plain.logits([[1, 2, 3]]), atol=1e-5)


def test_a_template_that_refuses_a_conversation_is_a_value_error():
    import tokenizers
    from tokenizers import models

    from shardinfer.weights.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m.role == messages[loop.index0 - 1]"
        ".role %}{{ raise_exception('roles must alternate') }}{% endif %}{{ m.content }}"
        "{% endfor %}"
    )
    tok = Tokenizer(backend, chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(ValueError, match="chat template refused the conversation: roles must"):
        tok.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        )
