"""The path-classifier recipe study (issue 19): validation splits only, tiny runs, and its held-out check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from firstmile_inference import ceiling, recipe_study
from firstmile_inference.models.network import TabularNet
from firstmile_inference.seed_study import SeedError
from firstmile_inference.simulate import generate
from firstmile_inference.train import train_path_classifier

SPREAD_KEYS = {"mean", "sd", "min", "max", "n"}


def test_a_tiny_study_prints_only_json_of_every_recipe_asked(capsys: pytest.CaptureFixture[str]) -> None:
    code = recipe_study.main(["--train-seeds", "3,4", "--sessions", "1500", "--recipes", "production,structured,ipw"])
    assert code == 0
    found = json.loads(capsys.readouterr().out)
    assert found["train_seeds"] == [3, 4]
    assert found["sessions"] == 1500
    assert found["exploration"] == 0.4
    assert set(found["recipes"]) == {"production", "structured", "ipw"}
    for name, entry in found["recipes"].items():
        assert entry["description"] == recipe_study.RECIPES[name].description
        assert entry["diagnostic"] is False
        for figure in ("val_path_accuracy", "val_loss", "val_dr", "val_snips"):
            assert set(entry[figure]) == SPREAD_KEYS
            assert entry[figure]["n"] == 2
        assert [r["train_seed"] for r in entry["runs"]] == [3, 4]
        for run in entry["runs"]:
            assert 0.0 <= run["val_path_accuracy"] <= 1.0
            assert 0.0 < run["val_loss"] < 2.0
            assert 1 <= run["epoch"] <= recipe_study.RECIPES[name].hyper.epochs


@pytest.mark.parametrize("seeds", ["1007", "8,1008", "1009,10"])
def test_it_refuses_a_held_out_seed_as_a_training_seed(seeds: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        recipe_study.main(["--train-seeds", seeds, "--sessions", "1500", "--recipes", "production"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "used for training or tuning" in captured.err
    with pytest.raises(SeedError):
        recipe_study.recipe_study(train_seeds=[int(s) for s in seeds.split(",")], recipes=("production",), sessions=100)


def test_it_refuses_an_unknown_recipe_or_exploration_before_simulating(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        recipe_study.main(["--train-seeds", "3", "--recipes", "production,magic"])
    assert exit_info.value.code == 2
    assert "magic" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        recipe_study.main(["--train-seeds", "3", "--recipes", "production", "--exploration", "0"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "--exploration" in captured.err and captured.out == ""
    with pytest.raises(ValueError, match="magic"):
        recipe_study.recipe_study(train_seeds=(3,), recipes=("magic",), sessions=100)


def test_the_production_recipe_is_what_train_registers() -> None:
    data = generate(2_000, seed=5)
    fitted = recipe_study.fit_recipe(data, "production", seed=5)
    registered = train_path_classifier(data, seed=5)
    assert fitted.chosen_epoch == registered.config["training"]["epochs"]
    assert fitted.validation["val_loss"] == pytest.approx(registered.metrics["val_loss"], abs=1e-3)
    assert fitted.validation["val_path_accuracy"] == pytest.approx(registered.metrics["path_accuracy"], abs=0.01)


def test_logging_propensities_are_the_simulated_logging_policy() -> None:
    data = generate(3_000, seed=6)
    p = recipe_study.logging_propensities(data)
    k = len(data.path_keys)
    assert set(np.round(p, 6).tolist()) <= {round(0.4 / k, 6), round(0.4 / k + 0.6, 6)}
    # every non-explored decision is the rules' path, so it carries the large propensity
    assert np.all(p[~data.explored] > 0.6)
    # the IPS-weighted logged outcomes estimate what "always path k" would achieve: the true mean of path k
    for key in ("generic", "developer-quickstart"):
        j = data.path_keys.index(key)
        q = np.zeros((data.n, k))
        q[:, j] = 1.0
        estimate = recipe_study.greedy_value(q, data.assigned, data.activated.astype(np.float64), p)
        assert estimate["snips"] == pytest.approx(float(data.expected[:, j].mean()), abs=0.04)


@pytest.mark.parametrize("recipe", ["structured", "step_targets"])  # step_targets: its training set keeps the time line
def test_the_held_out_check_of_a_recipe_reports_it_beside_production(recipe: str) -> None:
    found = ceiling.recipe_heldout_study(
        recipe, train_seeds=(3,), heldout_seeds=(1007,), train_sessions=1500, sessions=400
    )
    assert found["recipe"] == recipe
    assert set(found["path_accuracy"]) == SPREAD_KEYS
    assert set(found["production_path_accuracy"]) == SPREAD_KEYS
    assert [(r["train_seed"], r["heldout_seed"]) for r in found["runs"]] == [(3, 1007)]
    with pytest.raises(SeedError):
        ceiling.recipe_heldout_study("structured", train_seeds=(3,), heldout_seeds=(3,), train_sessions=100)


def test_the_ceiling_command_refuses_an_unknown_recipe_or_two_studies(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--recipe", "magic"], ["--recipe", "structured", "--ensemble", "3"]):
        with pytest.raises(SystemExit) as exit_info:
            ceiling.main(argv)
        assert exit_info.value.code == 2
    assert capsys.readouterr().out == ""


def test_weight_averaging_keeps_the_registered_network_form_and_averages() -> None:
    data = generate(1_500, seed=5)
    last = recipe_study.fit_recipe(data, "production", seed=5)
    averaged = recipe_study.fit_recipe(data, "swa", seed=5)
    assert recipe_study.RECIPES["swa"].hyper == recipe_study.RECIPES["production"].hyper  # only the averaging differs
    assert type(averaged.network) is type(last.network)
    assert averaged.chosen_epoch == last.chosen_epoch == recipe_study.PRODUCTION.epochs
    mine, theirs = averaged.network.state_dict(), last.network.state_dict()
    assert mine.keys() == theirs.keys()
    assert any(not torch.equal(mine[k], theirs[k]) for k in mine)  # the mean of epochs 9-16, not the last


def test_distillation_fits_one_network_to_its_teachers_on_every_path() -> None:
    data = generate(1_500, seed=6)
    student = recipe_study.fit_recipe(data, "distilled", seed=6)
    assert isinstance(student.network, TabularNet)
    q = student.probabilities(data)
    assert q.shape == (data.n, len(data.path_keys))
    teachers = [recipe_study.fit_recipe(data, "epochs8", seed=6, init_seed=6_000 + k) for k in range(5)]
    target = np.mean([t.probabilities(data) for t in teachers], axis=0)
    independent = recipe_study.fit_recipe(data, "epochs8", seed=6).probabilities(data)  # not one of the teachers
    # the student learnt the teachers' mean on every path: closer to it than a network fitted on its own
    assert np.abs(q - target).mean() < 0.5 * np.abs(independent - target).mean()


def test_step_targets_learn_from_the_logged_steps_and_register_only_the_activation_head() -> None:
    data = generate(1_500, seed=7, keep_timeline=True)
    fitted = recipe_study.fit_recipe(data, "step_targets", seed=7)
    assert isinstance(fitted.network, TabularNet)
    assert fitted.probabilities(data).shape == (data.n, len(data.path_keys))  # the step head is gone
    rows = np.arange(data.n)
    reached, done = recipe_study._step_outcomes(data, rows)
    assert torch.all(done <= reached)  # a completed step was reached
    # a session that activated completed every step up to its path's activation step
    activation_step = np.array([data.catalog.paths[a].activation_index for a in data.assigned])
    completed = done.sum(dim=1).numpy()
    assert np.array_equal(completed > activation_step, data.activated)
    with pytest.raises(ValueError, match="time line"):
        recipe_study.fit_recipe(generate(300, seed=7), "step_targets", seed=7)
