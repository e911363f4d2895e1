import pytest

from bitalloc.allocator.budget import BudgetError
from bitalloc.allocator.config import ConfigError, RunConfig, load_config


def test_default_is_valid():
    cfg = load_config(None)
    assert cfg.model.spec == "smollm2" and cfg.calibration.source == "generated"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[model]\nspec = "random:llama-tiny"\n[solve]\nbudgets = ["3bpw", "4bpw"]\n')
    cfg = load_config(p)
    assert cfg.model.spec == "random:llama-tiny" and cfg.solve.budgets == ("3bpw", "4bpw")


@pytest.mark.parametrize(
    "text,err,match",
    [
        ("[modle]\nspec='x'\n", ConfigError, "unknown section"),
        ("[model]\nspecc='x'\n", ConfigError, "unknown key"),
        ("[profile]\nschemes=['w9g7']\n", ConfigError, "w9g7"),
        ("[solve]\nbudgets=['3 bananas']\n", BudgetError, "3 bananas"),
        ("[solve]\nmethod='magic'\n", ConfigError, "method"),
        ("[eval]\nn_windows=0\n", ConfigError, "n_windows"),
        ("this is not toml", ConfigError, "not valid TOML"),
        ("[profile]\nfisher_labels='gold'\n", ConfigError, "fisher_labels"),
        ("[solve]\nselect_metric='ppl'\n", ConfigError, "select_metric"),
        ("[solve]\nselect_screen=-1\n", ConfigError, "select_screen"),
        ("[solve]\nselect_keep=0\n", ConfigError, "select_keep"),
        ("[profile]\nfisher_labels='both'\nfisher_table=false\n", ConfigError, "fisher_labels = both"),
    ],
)
def test_bad_config(tmp_path, text, err, match):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(err, match=match):
        load_config(p)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_logits_memory_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[eval]\nlogits_memory = "512MiB"\n')
    assert load_config(p).eval.logits_memory == "512MiB"
    p.write_text('[eval]\nlogits_memory = "lots"\n')
    with pytest.raises(ConfigError, match="logits_memory"):
        load_config(p)


def test_fisher_settings_resolve_auto(tmp_path):
    """The main job: hybrid references, Fisher table and selection for a causal LM; measured
    references alone for an encoder, the llama.cpp target, a measured table; explicit keys win."""
    cfg = load_config(None)
    assert cfg.fisher_settings("causal-lm") == ("hybrid", True, True)
    assert cfg.fisher_settings("encoder") == ("measured", False, False)
    assert cfg.profile_config("causal-lm").ref_method == "hybrid" and cfg.profile_config("encoder").fisher_table is False
    p = tmp_path / "c.toml"
    for body, want in [('[profile]\ntarget = "llamacpp"', ("measured", False, False)),
                       ('[profile]\nmeasured = true', ("measured", False, False)),
                       ('[profile]\nref_method = "measured"', ("measured", False, False)),
                       ('[profile]\nref_method = "measured"\nfisher_table = true', ("measured", True, True)),
                       ('[profile]\nfisher_table = false', ("hybrid", False, False)),
                       ('[solve]\nselect = false', ("hybrid", True, False))]:
        p.write_text(body + "\n")
        assert load_config(p).fisher_settings("causal-lm") == want, body
    p.write_text('[profile]\nfisher_labels = "both"\n')
    cfg = load_config(p)
    assert cfg.profile_config("causal-lm").fisher_labels == "both"
    assert cfg.profile_config("encoder").fisher_labels == "sampled"  # no Fisher table for an encoder


def test_fisher_labels_auto_follows_the_calibration(tmp_path):
    """fisher_labels = "auto" (the default): both label kinds when calibrating on a text file,
    the sampled labels on generated calibration (its next tokens were sampled from the model)
    and wherever there is no Fisher table; an explicit value wins."""
    cfg = load_config(None)
    assert cfg.profile.fisher_labels == "auto" and cfg.calibration.source == "generated"
    assert cfg.profile_config("causal-lm").fisher_labels == "sampled"  # the main job: unchanged
    text = tmp_path / "calib.txt"
    text.write_text("some text\n")
    p = tmp_path / "c.toml"
    for body, kind, want in [(f'[calibration]\nsource = "{text}"', "causal-lm", "both"),
                             (f'[calibration]\nsource = "{text}"', "encoder", "sampled"),
                             (f'[calibration]\nsource = "{text}"\n[profile]\nfisher_table = false', "causal-lm", "sampled"),
                             (f'[calibration]\nsource = "{text}"\n[profile]\nfisher_labels = "sampled"', "causal-lm", "sampled"),
                             ('[profile]\nfisher_labels = "text"', "causal-lm", "text")]:
        p.write_text(body + "\n")
        assert load_config(p).fisher_labels(kind) == want, (body, kind)
        assert load_config(p).profile_config(kind).fisher_labels == want, (body, kind)
