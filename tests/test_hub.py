"""Models named by hub id (``org/name`` + revision), resolved offline from a hub cache on disk.

The cache is laid out as huggingface_hub writes it (``models--org--name/snapshots/<commit>/``
and ``refs/main``) under ``tmp_path``, with ``HF_HOME``/``HF_HUB_CACHE`` pointing there and
``HF_HUB_OFFLINE=1``: nothing here reaches the network.
"""

from __future__ import annotations

import pytest

from hs_star_pl.infra.errors import ConfigError
from hs_star_pl.tensors.hub import hub_source, is_hub_id, resolve_model
from hs_star_pl.tensors.tiny import build_byte_tokenizer, build_tiny_causal_lm, save_checkpoint_dir
from tests.helpers.tiny_setup import REPO

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "tiny-org/tiny-policy"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline hub cache holding ``tiny-org/tiny-policy`` (a tiny Qwen2 model) at ``COMMIT``."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf"
    cache = home / "hub"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variables once, when it is imported: set what it read
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    tokenizer = build_byte_tokenizer()
    save_checkpoint_dir(repo / "snapshots" / COMMIT, build_tiny_causal_lm(tokenizer, hidden_size=32, num_hidden_layers=1,
                                                                          num_attention_heads=2, num_key_value_heads=1,
                                                                          intermediate_size=64), tokenizer)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


def test_hub_id_shape():
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    assert not is_hub_id("checkpoints/tiny/m0")  # a local path still to be made
    assert not is_hub_id("./org/name") and not is_hub_id("/abs/path") and not is_hub_id("../up")
    assert not is_hub_id("data/tiny/m0")  # exists here: a local folder
    assert not is_hub_id("m0")


def test_a_hub_id_resolves_to_its_cached_snapshot_offline(hub_cache):
    assert resolve_model(REPO_ID) == str(hub_cache)
    assert resolve_model(REPO_ID, revision=COMMIT) == str(hub_cache)
    assert resolve_model(REPO_ID, revision="main") == str(hub_cache)
    assert hub_source(hub_cache) == f"{REPO_ID}@{COMMIT}"
    assert hub_source(REPO / "data" / "tiny" / "m0") is None
    # a local folder is itself, and a revision for it is refused by its key
    assert resolve_model(str(REPO / "data" / "tiny" / "m0")) == str(REPO / "data" / "tiny" / "m0")
    with pytest.raises(ConfigError, match=r"^model.revision=v1 is for a hub id, but model.model_path=.* is a local folder$"):
        resolve_model(str(REPO / "data" / "tiny" / "m0"), revision="v1")


def test_an_unknown_hub_id_or_revision_fails_fast_with_one_message(hub_cache):
    with pytest.raises(ConfigError) as err:
        resolve_model("tiny-org/no-such-model", key="prm.init_args.model_path")
    message = str(err.value)
    assert message == (f"prm.init_args.model_path=tiny-org/no-such-model is not a local folder, and the hub id is not in "
                       f"the cache {hub_cache.parents[2]} (HF_HUB_OFFLINE=1, so nothing is downloaded)")
    with pytest.raises(ConfigError, match=r"model.model_path=tiny-org/tiny-policy \(model.revision=v9\) is not a local "
                                          r"folder, and the hub id is not in the cache"):
        resolve_model(REPO_ID, revision="v9")
    with pytest.raises(ConfigError, match=r"^model.model_path=checkpoints/no/such/m0 does not exist: a local Hugging Face "
                                          r"model folder is expected .* or a hub id \(org/name\)$"):
        resolve_model("checkpoints/no/such/m0")


def test_the_policy_and_the_cli_take_a_hub_id(hub_cache, tmp_path):
    """``--model.model_path org/name`` loads the cached snapshot; with the demo config's
    ``stepwise_init`` key set it does not start training M_0 (it did: into ./org/name.run/)."""
    from hs_star_pl.cli import HSStarCLI

    args = ["-c", str(REPO / "configs" / "tiny" / "hs_star.yaml"), f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--model.model_path={REPO_ID}", f"--model.revision={COMMIT}", "--trainer.logger=false"]
    cli = HSStarCLI(args=args, run=False)
    assert cli.model.model_path == REPO_ID and cli.model.model_dir == str(hub_cache)
    assert cli.model.model.config.hidden_size == 32
    assert cli.model._base_source() == f"{REPO_ID}@{COMMIT}"
    assert not (REPO / "tiny-org").exists() and not (tmp_path / "tiny-org").exists()
    with pytest.raises(ConfigError, match=r"model.model_path=tiny-org/missing is not a local folder, and the hub id "
                                          r"is not in the cache"):
        HSStarCLI(args=[*args[:4], "--model.model_path=tiny-org/missing", "--trainer.logger=false"], run=False)
    assert not (REPO / "tiny-org").exists()


def test_a_learned_prm_and_the_vllm_engine_take_a_hub_id(hub_cache, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    from hs_star_pl.engines.vllm import VLLMEngine
    from hs_star_pl.prm import SkyworkPRM
    from hs_star_pl.prm.hf import build_tiny_prm_dir

    prm_repo = hub_cache.parents[2] / "models--tiny-org--tiny-prm"
    build_tiny_prm_dir(prm_repo / "snapshots" / COMMIT, "skywork")
    (prm_repo / "refs").mkdir()
    (prm_repo / "refs" / "main").write_text(COMMIT)
    prm = SkyworkPRM("tiny-org/tiny-prm", device="cpu", progress=False)
    assert prm.model_path == prm_repo / "snapshots" / COMMIT
    with pytest.raises(ValueError, match=r"prm.init_args.model_path=tiny-org/nope is not a local folder"):
        SkyworkPRM("tiny-org/nope", device="cpu", progress=False)
    # the engine is only built here (vLLM starts on first use): it holds the snapshot folder
    engine = VLLMEngine(model_path=REPO_ID)
    assert engine.model_path == str(hub_cache) and engine.build_llm_kwargs(on_cpu=True)["model"] == str(hub_cache)
    assert constants.HF_HUB_OFFLINE
