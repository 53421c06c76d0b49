"""The settings record of a run folder (``hs_star_pl.core.fingerprint``): what counts, how records compare, the refusal.

Pure and fast; the same through the real CLI (re-runs and resumes of a run folder with
edited settings) is in ``test_run_folders.py``.
"""

from __future__ import annotations

import importlib
import os
import shutil

import pytest

from hs_star_pl.core.fingerprint import (
    MOVED,
    SettingsRecord,
    counts,
    differences,
    mismatch_message,
    read_record,
    recorded_rounds,
    settings_of,
    write_record,
)
from hs_star_pl.core.records import Problem
from hs_star_pl.infra.digests import DigestCache
from hs_star_pl.infra.errors import ConfigError

K = "self_training.budget.init_args.samples_per_problem"
POOL = [Problem("p1", "Start with 2. Add 3. What is the result?", "5"), Problem("p2", "Start with 4. Add 1.", "5")]


def config(**overrides):
    """A parsed config as the CLI holds it (nested, components as class_path + init_args)."""
    base = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "enable_progress_bar": True, "default_root_dir": "runs/a", "accumulate_grad_batches": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs/a"}}},
        "model": {"model_path": "m0", "tiny": None, "beta": 0.1, "nonfinite_loss": "raise",
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4}}},
        "data": {"template": "plain", "max_length": 192, "batch_size": 8, "num_workers": 0, "ref_batch_size": 16},
        "self_training": {
            "problems_file": "pool.jsonl", "problem_fields": {"question_key": None},
            "budget": {"class_path": "hs_star_pl.core.budget.HierarchicalBudget", "init_args": {"samples_per_problem": 4, "n_presample": 2}},
            "difficulty": {"tau_low": 0.25, "tau_high": 0.75}, "selection": {"train_classes": ["boundary"]},
            "sampling": {"temperature": 0.7, "top_p": 0.95, "stop": []}, "seed": 0, "n_iterations": 2, "plots": True,
            "engine": {"class_path": "hs_star_pl.engines.HFEngine", "init_args": {"batch_size": 64, "progress": False}},
            "verifier": {"class_path": "hs_star_pl.verifiers.MathVerifyVerifier", "init_args": {"n_workers": 2, "timeout_s": 5.0}},
            "prm": {"class_path": "hs_star_pl.prm.HFPRM", "init_args": {"model_path": "prm", "batch_size": 8, "device": "auto"}},
            "on_empty_round": "skip",
        },
        "export": {"dirname": "hf"},
        "evaluation": {"benchmarks": None},
    }
    for key, value in overrides.items():
        node = base
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return base


def record(problems=POOL, problems_file="pool.jsonl", **overrides) -> SettingsRecord:
    return settings_of(config(**overrides), problems, problems_file)


@pytest.mark.parametrize("key", [
    K, "self_training.budget.init_args.n_presample", "self_training.budget.class_path",
    "self_training.selection.train_classes", "self_training.difficulty.tau_low", "self_training.sampling.temperature",
    "self_training.seed", "self_training.engine.init_args.batch_size", "self_training.verifier.init_args.timeout_s",
    "self_training.prm.init_args.model_path", "model.model_path", "model.optimizer.init_args.lr", "model.beta",
    "seed_everything", "data.template", "data.system_prompt", "data.batch_size", "trainer.accumulate_grad_batches",
    "self_training.engine.init_args.llm_kwargs.quantization",  # some vllm.LLM arguments change the samples
])
def test_a_setting_that_decides_a_round_counts(key):
    assert counts(key)


@pytest.mark.parametrize("key", [
    "trainer.enable_progress_bar", "trainer.logger.init_args.save_dir", "trainer.default_root_dir", "trainer.max_epochs",
    "self_training.plots", "self_training.n_iterations", "self_training.on_empty_round", "self_training.engine.init_args.progress",
    "self_training.verifier.init_args.n_workers", "self_training.prm.init_args.batch_size", "self_training.prm.init_args.device",
    "self_training.engine.init_args.gpu_memory_utilization", "data.num_workers", "data.ref_batch_size",
    "model.nonfinite_loss", "export.dirname", "evaluation.benchmarks",
    "model.attn_implementation", "self_training.prm.init_args.attn_implementation",  # same math, another kernel
    "self_training.engine.init_args.kv_cache",  # same keys and values, another memory layout
    "model.packing",  # the same sequences, laid out without padding
    "model.logp_chunk_size",  # the same log-probs, a chunk of positions at a time
    "self_training.prm.init_args.offload",  # the same weights, elsewhere between rounds
])
def test_logging_progress_bars_paths_and_resources_do_not_count(key):
    assert not counts(key)


def test_edits_that_cannot_change_a_round_leave_the_record_equal():
    edited = record(**{"trainer.enable_progress_bar": False, "self_training.plots": False, "self_training.n_iterations": 5,
                       "trainer.max_epochs": 5, "self_training.engine.init_args.progress": True,
                       "self_training.verifier.init_args.n_workers": 8, "data.num_workers": 4})
    assert differences(record(), edited) == {}
    assert edited.fingerprint == record().fingerprint


def test_the_pool_is_recorded_by_content_not_by_path():
    moved = record(problems_file="elsewhere/pool.jsonl", **{"self_training.problems_file": "elsewhere/pool.jsonl"})
    assert differences(record(), moved) == {}
    edited = record(problems=[POOL[0], Problem("p2", "Start with 4. Add 2.", "6")])
    assert list(differences(record(), edited)) == ["self_training.problems_file"]
    fewer = record(problems=POOL[:1])
    assert list(differences(record(), fewer)) == ["self_training.problems_file"]


def test_differences_name_each_changed_key_with_both_values():
    changed = record(**{K: 6, "self_training.seed": 5, "self_training.sampling.temperature": 1.0})
    assert differences(record(), changed) == {
        K: (4, 6), "self_training.seed": (0, 5), "self_training.sampling.temperature": (0.7, 1.0),
    }


def test_a_component_swapped_for_another_differs_in_its_class_and_its_arguments():
    swapped = record(**{"self_training.budget": {"class_path": "hs_star_pl.core.budget.UniformBudget",
                                                 "init_args": {"samples_per_problem": 4}}})
    diff = differences(record(), swapped)
    assert diff["self_training.budget.class_path"] == ("hs_star_pl.core.budget.HierarchicalBudget", "hs_star_pl.core.budget.UniformBudget")
    assert "self_training.budget.init_args.n_presample" in diff  # recorded, not set now


def test_a_record_of_another_format_version_is_compared_on_the_keys_both_hold():
    old = SettingsRecord({"self_training.seed": 0, "some.key.this.version.dropped": 1}, version=0)
    assert differences(old, record()) == {}
    assert differences(SettingsRecord({"self_training.seed": 3}, version=0), record()) == {"self_training.seed": (3, 0)}


def test_a_record_naming_a_class_by_its_old_module_matches_the_class_where_it_lives_now(tmp_path):
    """Run folders made before the budget allocators moved to ``hs_star_pl.core.budget``
    record ``hs_star_pl.budget.<name>``: read back, rounds and checkpoint agree with today's
    config; another allocator under the old name still differs."""
    write_record(tmp_path, record())
    stored = (tmp_path / "settings.json").read_text()
    (tmp_path / "settings.json").write_text(stored.replace("hs_star_pl.core.budget.", "hs_star_pl.budget."))
    assert '"hs_star_pl.budget.HierarchicalBudget"' in (tmp_path / "settings.json").read_text()
    assert differences(read_record(tmp_path), record()) == {}
    from_checkpoint = SettingsRecord.from_dict({**record().to_dict(), "settings": {
        **record().settings, "self_training.budget.class_path": "hs_star_pl.budget.UniformBudget"}})
    assert differences(from_checkpoint, record())["self_training.budget.class_path"] == (
        "hs_star_pl.core.budget.UniformBudget", "hs_star_pl.core.budget.HierarchicalBudget")


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_each_moved_module_is_gone_from_its_old_path_and_importable_at_its_new_one(old, new):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old.rstrip("."))
    importlib.import_module(new.rstrip("."))


def test_a_record_made_before_the_layer_folders_matches_todays_config(tmp_path):
    """Run folders written while the schedules and strategies lived in flat modules record
    ``hs_star_pl.schedules.WarmupCosineLR``; read back, they match the config that names
    ``hs_star_pl.tensors.schedules.WarmupCosineLR``."""
    key = "model.lr_scheduler"
    today = record(**{key: {"class_path": "hs_star_pl.tensors.schedules.WarmupCosineLR"}})
    write_record(tmp_path, today)
    stored = (tmp_path / "settings.json").read_text()
    (tmp_path / "settings.json").write_text(stored.replace("hs_star_pl.tensors.schedules.", "hs_star_pl.schedules."))
    assert '"hs_star_pl.schedules.WarmupCosineLR"' in (tmp_path / "settings.json").read_text()
    assert differences(read_record(tmp_path), today) == {}
    assert differences(read_record(tmp_path), record(**{key: {"class_path": "torch.optim.lr_scheduler.LinearLR"}})) == {
        f"{key}.class_path": ("hs_star_pl.tensors.schedules.WarmupCosineLR", "torch.optim.lr_scheduler.LinearLR")}


def test_the_refusal_lists_every_key_with_its_values_per_round_and_both_ways_out(tmp_path):
    write_record(tmp_path / "rounds" / "round_000", record())
    write_record(tmp_path / "rounds" / "round_001", record(**{"self_training.budget.init_args.n_presample": 3}))
    found = recorded_rounds(tmp_path)
    assert [t for t, _ in found] == [0, 1]
    current = record(**{K: 6, "self_training.seed": 5}, problems_file="new.jsonl", problems=POOL[:1])
    message = mismatch_message(f"{tmp_path} holds rounds", found, current, tmp_path)
    lines = message.splitlines()
    assert lines[0] == (f"{tmp_path} holds rounds made with other settings, and this run would mix them with its own. "
                        "The settings that differ:")
    assert f"  - {K}: 4 in rounds 0, 1; 6 now" in lines
    assert "  - self_training.budget.init_args.n_presample: 3 in round 1; 2 now" in lines  # round 0 agrees
    assert "  - self_training.seed: 0 in rounds 0, 1; 5 now" in lines
    (pool_line,) = [line for line in lines if line.startswith("  - self_training.problems_file: ")]
    assert "(pool.jsonl, 2 problems) in rounds 0, 1;" in pool_line and pool_line.endswith("(new.jsonl, 1 problems) now")
    assert lines[-1] == ("Either give this configuration a run folder of its own (a new trainer.default_root_dir), or "
                         f"restore the settings above to continue the run in {tmp_path}.")
    assert mismatch_message("x", [(0, record())], record(**{"self_training.plots": False}), tmp_path) is None


def test_a_checkpoint_without_a_settings_record_still_refuses_another_seed():
    """A checkpoint from before settings were recorded: a changed seed used to be a warning."""
    from hs_star_pl.training.self_training import SelfTrainingCallback

    callback = SelfTrainingCallback(seed=5)
    callback._settings = record(**{"self_training.seed": 5})  # what setup() records for an active fit
    with pytest.raises(ConfigError, match=r"(?s)was made with other settings.*self_training.seed: 0 in the checkpoint; 5 now"):
        callback.load_state_dict({"schema_version": 2, "seed": 0, "problems_file": None, "iteration": 0, "rounds": []})
    callback.load_state_dict({"schema_version": 2, "seed": 5, "problems_file": None, "iteration": 0, "rounds": []})


# -- the models by content ----------------------------------------------------------------


def _model_folder(path, payload: bytes):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(payload)
    return path


def _copy_keeping_size_and_times(source, target):
    """What ``cp -p`` and ``rsync -a`` leave: the new bytes, the old size and modification time."""
    before = target.stat()
    shutil.copy2(source, target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.mark.parametrize("key", ["model.model_path", "self_training.prm.init_args.model_path"])
def test_a_model_replaced_at_the_same_path_is_refused_naming_its_folder_and_both_ways_out(key, tmp_path):
    """Weights copied over the folder a run was made with (same size, old modification time)."""
    folder = _model_folder(tmp_path / "model", b"old weights " * 100)
    _model_folder(tmp_path / "other", b"new weights " * 100)
    cache = DigestCache(tmp_path / "run" / "weight_digests.json")
    made = record(**{key: str(folder)}) if key == "model.model_path" else settings_of(
        config(**{"self_training.prm.init_args.model_path": str(folder)}), POOL, "pool.jsonl", digest_cache=cache)
    assert made.settings[f"{key} (weights)"].startswith("sha256:")
    assert differences(made, settings_of(config(**{key: str(folder)}), POOL, "pool.jsonl", digest_cache=cache)) == {}
    _copy_keeping_size_and_times(tmp_path / "other" / "model.safetensors", folder / "model.safetensors")
    now = settings_of(config(**{key: str(folder)}), POOL, "pool.jsonl", digest_cache=cache)
    assert list(differences(made, now)) == [f"{key} (weights)"]
    lines = mismatch_message("the checkpoint x was", [("the checkpoint", made)], now, tmp_path / "run").splitlines()
    assert lines[1].startswith(f"  - {key} (weights): ") and f"(1 weight file in {folder}) in the checkpoint;" in lines[1]
    assert lines[-1] == ("Either give this configuration a run folder of its own (a new trainer.default_root_dir), or "
                         f"restore the settings above (and the weight files the run was made with in {folder}) to "
                         f"continue the run in {tmp_path / 'run'}.")


def test_a_record_without_weights_from_before_they_were_recorded_still_matches(tmp_path):
    folder = _model_folder(tmp_path / "model", b"w")
    now = record(**{"model.model_path": str(folder)})
    older = SettingsRecord({k: v for k, v in now.settings.items() if not k.endswith(" (weights)")}, version=1)
    assert differences(older, now) == {}
