"""AutoAttack behind one interface: adapters for the GitHub and PyPI APIs (fakes with the exact signatures and
real runs), equality with the original called directly, and torchattacks configured to match."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_sparse.errors import UserError
from robust_sparse.eval import evaluate, parse_attacks
from robust_sparse.eval.autoattack import (STANDARD_ATTACKS, GitHubAutoAttack, PyAutoAttack, select_backend,
                                           torchattacks_autoattack)
from robust_sparse.eval.sanity import check_evaluation

EPS = 0.1


class MarkerModel(nn.Module):
    """Predicts the class written in pixel (0, 0): round(10 * x[:, 0, 0, 0]). Moving it by eps changes the class."""

    def forward(self, x):
        return 5.0 * F.one_hot((10 * x[:, 0, 0, 0]).round().long().clamp(0, 9), 10).float()


def _marked_points(mnist, n=30):
    """Real digits with their label written into pixel (0, 0), so MarkerModel classifies them all correctly."""
    _, test = mnist
    images = test.images[:n].float() / 255
    labels = test.labels[:n]
    images[:, 0, 0, 0] = labels.float() / 10
    return images, labels


# Which labels each sub-attack of the fakes breaks (by moving the marker pixel by eps): known expected flags.
BREAKS = {"apgd-ce": {0, 3, 6}, "apgd-t": {1, 3}, "fab-t": {4}, "square": {2, 9}}


def _fake_attack(x, y, attacks_to_run, eps):
    adversarial = x.clone()
    broken = torch.tensor([int(label) in BREAKS[attacks_to_run[0]] for label in y])
    direction = torch.where(y < 9, 1.0, -1.0)
    adversarial[broken, 0, 0, 0] += eps * direction[broken]
    return adversarial


class FakeGitHubAutoAttack:
    """fra31/auto-attack's API, signature for signature."""

    def __init__(self, model, norm='Linf', eps=.3, seed=None, verbose=True, attacks_to_run=[], version='standard',
                 is_tf_model=False, device='cuda', log_path=None):
        if version != "custom" and attacks_to_run != []:
            raise ValueError("attacks_to_run will be overridden unless you use version='custom'")
        self.model, self.norm, self.epsilon, self.seed, self.verbose = model, norm, eps, seed, verbose
        self.version, self.device, self.log_path = version, device, log_path
        self.attacks_to_run = list(STANDARD_ATTACKS) if version == "standard" else attacks_to_run
        self.calls = []

    def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False):
        self.calls.append((list(self.attacks_to_run), len(x_orig), bs))
        print("Warning: it seems to be a randomized defense! Please use version=\"rand\".")  # the GitHub package prints
        x_adv = _fake_attack(x_orig, y_orig, self.attacks_to_run, self.epsilon)
        return (x_adv, y_orig) if return_labels else x_adv


class FakePyAutoAttack:
    """pyautoattack 0.2.0's API, signature for signature."""

    def __init__(self, model, *, attacks=None, device='cpu', eps=0.3, norm='Linf', seed=None, version='standard'):
        if version in ["standard", "plus", "rand"] and attacks is not None:
            raise ValueError("attacks_to_run will be overridden unless you use version='custom'")
        self.model, self.device, self.epsilon, self.norm, self.seed, self.version = model, device, eps, norm, seed, version
        self.attacks_to_run = list(STANDARD_ATTACKS) if version == "standard" else attacks
        self.calls = []

    def run_standard_evaluation(self, x_orig, y_orig, /, *, batch_size=250, state_path=None):
        self.calls.append((list(self.attacks_to_run), len(x_orig), batch_size))
        logging.getLogger("auto-attack").warning("there are 3 points with zero gradient!")
        return _fake_attack(x_orig, y_orig, self.attacks_to_run, self.epsilon), y_orig


def _shape(function):
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


def test_the_fakes_have_the_real_signatures():
    import pyautoattack

    from robust_sparse.environment.compat import import_autoattack

    assert _shape(FakePyAutoAttack.__init__) == _shape(pyautoattack.AutoAttack.__init__)
    assert _shape(FakePyAutoAttack.run_standard_evaluation) == _shape(pyautoattack.AutoAttack.run_standard_evaluation)
    github = import_autoattack().AutoAttack  # the GitHub API (real package or robust-sparse's alias)
    assert _shape(FakeGitHubAutoAttack.__init__) == _shape(github.__init__)
    # the alias adds state_path (newer GitHub commits have it too); our adapter never passes it
    assert _shape(FakeGitHubAutoAttack.run_standard_evaluation) == _shape(github.run_standard_evaluation)[:5]


@pytest.mark.parametrize("adapter, fake", [(GitHubAutoAttack, FakeGitHubAutoAttack), (PyAutoAttack, FakePyAutoAttack)])
def test_adapter_drives_its_api_sub_attack_by_sub_attack(adapter, fake, mnist):
    images, labels = _marked_points(mnist)
    backend = adapter(fake)
    result = evaluate(MarkerModel(), images, labels, norm="linf", eps=EPS, large_eps=None, attacks=parse_attacks("autoattack"),
                      batch_size=8, seed=7, backend=backend)
    outcome = result.outcomes[0]
    assert result.clean_accuracy == 1.0
    broken_labels = set().union(*BREAKS.values())
    assert torch.equal(outcome.robust, torch.tensor([int(y) not in broken_labels for y in labels]))
    for index, unit in enumerate(STANDARD_ATTACKS):  # each point is credited to the first sub-attack that broke it
        first = {int(y) for y in labels[outcome.broken_by == index]}
        earlier = set().union(*(BREAKS[u] for u in STANDARD_ATTACKS[:index]))
        assert first == (BREAKS[unit] - earlier) & {int(y) for y in labels}
    message = "Warning: it seems" if adapter is GitHubAutoAttack else "zero gradient"  # printed / logged
    assert len(result.autoattack_messages) == 1 and message in result.autoattack_messages[0]
    assert any("AutoAttack's own check" in w for w in check_evaluation(result))


class CountingPyAutoAttack(FakePyAutoAttack):
    """Warns as pyautoattack does: once per call, with that call's count of points."""

    def run_standard_evaluation(self, x_orig, y_orig, /, *, batch_size=250, state_path=None):
        self.calls.append((list(self.attacks_to_run), len(x_orig), batch_size))
        logging.getLogger("auto-attack").warning(f"there are {len(x_orig)} points with zero gradient! This might "
                                                 "lead to unreliable evaluation with gradient-based attacks.")
        logging.getLogger("auto-attack").warning("a warning without a count")
        return _fake_attack(x_orig, y_orig, self.attacks_to_run, self.epsilon), y_orig


def test_autoattack_warnings_differing_only_in_their_count_are_kept_once_with_the_largest(mnist):
    images, labels = _marked_points(mnist, 30)
    result = evaluate(MarkerModel(), images, labels, norm="linf", eps=EPS, large_eps=None, attacks=parse_attacks("autoattack"),
                      batch_size=8, seed=7, backend=PyAutoAttack(CountingPyAutoAttack))
    assert result.autoattack_messages == [
        "there are 8 points with zero gradient! This might lead to unreliable evaluation with gradient-based "
        "attacks.", "a warning without a count"]  # 4 sub-attacks x batches of 8 and fewer points: one each
    assert sum("zero gradient" in warning for warning in check_evaluation(result)) == 1


@pytest.mark.parametrize("adapter, fake", [(GitHubAutoAttack, FakeGitHubAutoAttack), (PyAutoAttack, FakePyAutoAttack)])
def test_adapter_builds_the_standard_version_with_our_settings(adapter, fake, mnist):
    images, labels = _marked_points(mnist, 20)
    backend = adapter(fake)
    handle = backend.create(MarkerModel(), norm="l2", eps=0.5, seed=11, device="cpu")
    assert (handle.norm, handle.epsilon, handle.seed, handle.version, handle.device) == ("L2", 0.5, 11, "standard", "cpu")
    adversarial = backend.attack(handle, "apgd-t", images, labels, batch_size=20)
    assert adversarial.shape == images.shape and handle.calls == [(["apgd-t"], 20, 20)]
    with pytest.raises(ValueError):
        backend.attack(handle, "apgd-dlr", images, labels, batch_size=20)


def test_early_exit_only_still_robust_points_reach_later_sub_attacks(mnist):
    images, labels = _marked_points(mnist)
    fake_instances = []

    class Recording(FakePyAutoAttack):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            fake_instances.append(self)

    evaluate(MarkerModel(), images, labels, norm="linf", eps=EPS, large_eps=None, attacks=parse_attacks("autoattack"), batch_size=100,
             backend=PyAutoAttack(Recording))
    (fake,) = fake_instances
    sizes = {attacks[0]: n for attacks, n, _ in fake.calls}
    alive = [int(y) for y in labels]
    for unit in STANDARD_ATTACKS:
        assert sizes[unit] == len(alive)
        alive = [y for y in alive if y not in BREAKS[unit]]


def test_examples_outside_the_ball_never_count(mnist):
    images, labels = _marked_points(mnist)

    class Cheating(FakePyAutoAttack):
        def run_standard_evaluation(self, x_orig, y_orig, /, *, batch_size=250, state_path=None):
            adversarial = x_orig.clone()
            adversarial[:, 0, 0, 0] = (adversarial[:, 0, 0, 0] + 3 * self.epsilon).clamp(max=1)  # 3 eps away
            return adversarial, y_orig

    result = evaluate(MarkerModel(), images, labels, norm="linf", eps=EPS, large_eps=None, attacks=parse_attacks("apgd-ce"),
                      backend=PyAutoAttack(Cheating))
    assert result.outcomes[0].accuracy == 1.0  # every point stays robust
    assert result.invalid == {"APGD-CE": int((labels < 9).sum())}  # all that were "fooled" (9 + 0.3 clamps to 9)
    assert any("outside the threat model" in w for w in check_evaluation(result))


def test_backend_selection():
    assert isinstance(select_backend("auto"), PyAutoAttack)  # no GitHub autoattack installed here
    assert isinstance(select_backend("pyautoattack"), PyAutoAttack)
    assert isinstance(select_backend("github"), GitHubAutoAttack)
    with pytest.raises(UserError, match="choose one of"):
        select_backend("foolbox")


def test_real_runs_of_both_apis_agree(trained_tiny, mnist):
    _, test = mnist
    images, labels = test.images[:16].float() / 255, test.labels[:16]
    flags = []
    for name in ("pyautoattack", "github"):
        result = evaluate(trained_tiny, images, labels, norm="linf", eps=0.3, attacks=parse_attacks("autoattack"),
                          batch_size=16, autoattack_backend=name)
        assert result.autoattack_backend == select_backend(name).name
        flags.append(result.outcomes[0].robust)
    assert torch.equal(flags[0], flags[1]) and flags[0].sum() == 0  # a non-robust model at a large eps


def _same_as_direct(model, images, labels, batch_size):
    import pyautoattack

    ours = evaluate(model, images, labels, norm="linf", eps=0.1, attacks=parse_attacks("autoattack"),
                    batch_size=batch_size, seed=0, autoattack_backend="pyautoattack").outcomes[0]
    original = pyautoattack.AutoAttack(model, device="cpu", eps=0.1, norm="Linf", seed=0, version="standard")
    adversarial, _ = original.run_standard_evaluation(images, labels, batch_size=batch_size)
    with torch.no_grad():
        direct = model(adversarial).argmax(1) == labels
    assert torch.equal(ours.robust, direct)
    return ours


def test_project_autoattack_equals_the_original_called_directly(trained_tiny, mnist):
    """Same points, same seed, same batch size: the same per-point robust flags (hence accuracy) as
    pyautoattack's own run_standard_evaluation; eps 0.1 leaves points for every sub-attack to work on."""
    _, test = mnist
    images, labels = test.images[14:24].float() / 255, test.labels[14:24]
    ours = _same_as_direct(trained_tiny, images, labels, batch_size=10)
    assert ours.unit_accuracies()["apgd-ce"] > 0  # APGD-T, FAB-T and Square all ran


@pytest.mark.slow
def test_project_autoattack_equals_the_original_on_more_points_in_batches(trained_tiny, mnist):
    _, test = mnist
    _same_as_direct(trained_tiny, test.images[:64].float() / 255, test.labels[:64], batch_size=16)


@pytest.mark.parametrize("n_classes", [10, 100])
def test_torchattacks_is_configured_like_the_original(trained_tiny, n_classes):
    import torchattacks

    attack = torchattacks_autoattack(trained_tiny, norm="linf", eps=8 / 255, n_classes=n_classes, seed=3)
    apgd, apgd_t, fab, square = attack._autoattack.attacks
    assert (apgd.steps, apgd_t.steps, fab.steps) == (100, 100, 100)
    assert apgd_t.n_target_classes == fab.n_target_classes == 9
    assert square.n_queries == 5000 and square.rescale_schedule is False and square.p_init == 0.8
    assert apgd.loss == "ce" and fab.multi_targeted and attack.seed == 3
    assert all(part.seed == 3 for part in (apgd, apgd_t, fab, square))
    default = torchattacks.AutoAttack(trained_tiny, eps=8 / 255, n_classes=n_classes)._autoattack.attacks
    assert default[0].steps == 10 and default[1].n_target_classes == n_classes - 1  # why we reconfigure
