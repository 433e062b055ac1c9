"""Objectives on a 2-D Gaussian mixture with an analytic teacher score, and their invariants on tiny
real UNets: update isolation, finite losses, backward simulation."""
import contextlib
import copy

import pytest
import torch

from fewstep.core import distillation
from fewstep.families.edm import edm_trainer
from fewstep.core import objectives
from fewstep.core.objectives.base import Generated
from fewstep.core.training import Phase, _update, adamw
from toy import moment_error, student_points, toy_setup


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny MLP ops gain nothing from threads and stall badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("objective", ["dmd2", "dmd", "sid"])
def test_distribution_matching_moves_generator_to_the_mixture(objective, tmp_path):
    setup = toy_setup(objective)
    before = moment_error(student_points(setup))
    warm = setup.params.model_copy(update={"steps": 100})
    distillation.fit(setup, warm, tmp_path / "critic", "critic", train_generator=False)  # fake score warm start
    distillation.fit(setup, setup.params.model_copy(update={"steps": 300}), tmp_path / "distill", "distill")
    after = moment_error(student_points(setup))
    assert after < 0.35 * before, (objective, before, after)


def test_consistency_distillation_moves_generator_to_the_mixture(tmp_path):
    setup = toy_setup("consistency")
    before = moment_error(student_points(setup))
    distillation.fit(setup, setup.params.model_copy(update={"steps": 300}), tmp_path / "distill", "distill")
    after = moment_error(student_points(setup))
    assert after < 0.35 * before, (before, after)


# --- invariants on tiny real UNets (the digits pipeline's models) ------------------------------------


def tiny_unet_setup(objective: str, **params) -> objectives.Setup:
    from types import SimpleNamespace

    from fewstep.core.heads import FeatureTap, GanHead
    from fewstep.families.edm.unet import EDMDenoiser, build_unet, make_scheduler
    from fewstep.params import DistillParams
    from fewstep.families.edm.unet import karras_grid_sigmas

    edm = SimpleNamespace(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    torch.manual_seed(0)
    teacher = EDMDenoiser(build_unet(8, 1, 10, widths=[16, 32], layers_per_block=1), make_scheduler(edm), 10)
    student, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
    head = GanHead(32)
    gen = torch.Generator().manual_seed(0)
    p = DistillParams.model_validate({"objective": objective, "batch_size": 4, **params})
    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.0])
    states = torch.randn(16, 4, 1, 8, 8)

    def trajectories():
        idx = torch.randint(16, (4,), generator=gen)
        return {"noise": torch.randn(4, 1, 8, 8), "cond": idx % 10, "images": states[idx, -1],
                "states": states[idx], "sigmas": sigmas}

    return objectives.Setup(
        teacher=teacher.requires_grad_(False), student=student, fake=fake, head=head, tap=FeatureTap(fake.unet),
        real=lambda: (torch.randn(p.batch_size, 1, 8, 8, generator=gen).clamp(-1, 1), torch.arange(p.batch_size) % 10),
        conditions=lambda n: torch.randint(10, (n,), generator=gen),
        noise_levels=lambda n: karras_grid_sigmas(n, edm, p.t_min, p.t_max, gen),
        student_sigmas=edm_trainer.student_sigmas(p, edm), params=p, generator=gen, device=torch.device("cpu"),
        trajectories=trajectories)


def _snapshot(module):
    return [t.detach().clone() for t in module.parameters()]


def _unchanged(module, snapshot):
    return all(torch.equal(a, b) for a, b in zip(module.parameters(), snapshot))


@pytest.mark.parametrize("objective", sorted(objectives.OBJECTIVES))
def test_updates_touch_only_their_own_networks_and_losses_are_finite(objective):
    setup = tiny_unet_setup(objective, student_steps=2)
    obj = objectives.build(objective, setup)
    critic_net = obj.critic_modules()
    student_before, critic_before = _snapshot(setup.student), _snapshot(critic_net)
    teacher_before = _snapshot(setup.teacher)

    setup.student.requires_grad_(True)
    generator_phase = Phase("generator", setup.student, adamw(setup.student, setup.params), obj.generator_loss)
    logged = _update(generator_phase, 0, contextlib.nullcontext)
    assert all(torch.isfinite(torch.tensor(v)) for v in logged.values()), logged
    assert not _unchanged(setup.student, student_before)
    assert _unchanged(critic_net, critic_before), "a generator step changed the critic"
    assert all(t.grad is None for t in critic_net.parameters()), "a generator step left gradients in the critic"

    student_after = _snapshot(setup.student)
    critic_phase = Phase("critic", critic_net, adamw(critic_net, setup.params), obj.critic_loss)
    logged = _update(critic_phase, 0, contextlib.nullcontext)
    assert all(torch.isfinite(torch.tensor(v)) for v in logged.values()), logged
    assert not _unchanged(critic_net, critic_before)
    assert _unchanged(setup.student, student_after), "a critic step changed the student"
    assert _unchanged(setup.teacher, teacher_before)


def test_dmd2_losses_include_the_gan_terms():
    """The GAN terms enter both losses at their weights and reach what they train: the generator's term, through
    the frozen head and fake score, the student; the critic's term, the head."""
    setup = tiny_unet_setup("dmd2")
    obj = objectives.build("dmd2", setup)
    gan = setup.params.dmd2.gan
    generator = obj.generator_loss()
    torch.testing.assert_close(generator["loss"], generator["dm"] + gan.generator_weight * generator["gan"])
    generator["gan"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in setup.student.parameters())
    assert all(p.grad is None for p in [*setup.head.parameters(), *setup.fake.parameters()])
    critic = obj.critic_loss()
    torch.testing.assert_close(critic["loss"], critic["denoise"] + gan.critic_weight * critic["gan"])
    critic["gan"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in setup.head.parameters())


def test_dmd2_gan_head_on_its_own_noise_range_reads_its_own_fake_score_pass():
    """dmd2.gan.t_min/t_max: the GAN head scores a fake-score pass at its own (low) noise levels; the student
    still gets no gradient into the critic, and the critic's GAN terms use that range for both sides."""
    from types import SimpleNamespace

    from fewstep.core.training import NoiseRange
    from fewstep.families.edm.unet import karras_grid_sigmas

    edm = SimpleNamespace(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    setup = tiny_unet_setup("dmd2", t_min=0.5, t_max=0.7, dmd2={"gan": {"t_min": 0.9, "t_max": 1.0}})
    setup.gan_noise_levels = NoiseRange(lambda n, lo, hi: karras_grid_sigmas(n, edm, lo, hi, setup.generator), 0.9, 1.0)
    low = float(karras_grid_sigmas(1, edm, 0.9, 0.9))  # the largest sigma the GAN range can draw
    setup.fake = Recorder(setup.fake)
    obj = objectives.build("dmd2", setup)
    setup.student.requires_grad_(True)
    losses = obj.generator_loss()
    losses["loss"].backward()
    assert {"dm", "gan"} <= set(losses) and torch.isfinite(losses["loss"])
    assert [s <= low for _, s, _ in setup.fake.calls] == [False, True]  # the DM pass, then the GAN head's own
    assert all(p.grad is None for p in setup.fake.parameters()), "the generator's GAN pass trained the fake score"
    setup.fake.calls.clear()
    assert {"denoise", "gan"} <= set(obj.critic_loss())
    assert [s <= low for _, s, _ in setup.fake.calls] == [False, True, True]  # denoising, then student and real


def test_dmd2_gan_head_on_the_decoder_reads_full_resolution_features_and_a_mismatched_head_is_named(tmp_path):
    """dmd2.gan.features: decoder taps the fake score's last up-block (full resolution, the first block's
    channels); both GAN terms train; a critic's head made for the other features fails in one line."""
    from fewstep.core.distillation import check_head_fits
    from fewstep.core.heads import FeatureTap, GanHead
    from fewstep.params import ParamsError

    setup = tiny_unet_setup("dmd2", dmd2={"gan": {"features": "decoder"}})
    assert FeatureTap.channels(setup.fake.unet, "decoder") == 16
    setup.tap, setup.head = FeatureTap(setup.fake.unet, "decoder"), GanHead(16)
    obj = objectives.build("dmd2", setup)
    setup.student.requires_grad_(True)
    losses = obj.generator_loss()
    assert setup.tap.features.shape[-2:] == (8, 8)  # the sample's own resolution (the bottleneck is 4x4)
    losses["loss"].backward()
    assert torch.isfinite(losses["gan"])
    head_before = _snapshot(setup.head)
    critic = obj.critic_modules()
    _update(Phase("critic", critic, adamw(critic, setup.params), obj.critic_loss), 0, contextlib.nullcontext)
    assert not _unchanged(setup.head, head_before)
    with pytest.raises(ParamsError, match=r"^distill\.dmd2\.gan\.features: 'decoder' does not fit the GAN head in "
                                          r".*critic \(32 input channels\); set it as critic\.gan\.features$"):
        check_head_fits(GanHead(32), 16, "decoder", "distill", tmp_path / "critic")


def test_scheduled_noise_range_moves_linearly_from_start_to_end():
    from fewstep.core.training import NoiseRange

    drawn = []
    levels = NoiseRange(lambda n, lo, hi: drawn.append((lo, hi)) or torch.zeros(n), 0.2, 0.9, end=(0.5, 0.7), steps=11)
    for step in (0, 5, 10):
        levels.at(step)
        levels(3)
    assert [tuple(round(v, 6) for v in b) for b in drawn] == [(0.2, 0.9), (0.35, 0.8), (0.5, 0.7)]
    fixed = NoiseRange(lambda n, lo, hi: torch.full((n,), lo), 0.2, 0.9)
    fixed.at(7)
    assert fixed.bounds() == (0.2, 0.9)


class Recorder(torch.nn.Module):
    """Wraps a denoiser and records every call's input and output (and its conditions in `conds`)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.conds = inner, [], []

    @property
    def unet(self):
        return self.inner.unet

    def forward(self, x, sigma, cond):
        out = self.inner(x, sigma, cond)
        self.conds.append(cond.clone())
        self.calls.append((x.detach().clone(), float(torch.as_tensor(sigma).reshape(-1)[0]), out.detach().clone()))
        return out


def record_batches(obj) -> list:
    """Keep every batch `obj.generate()` makes (samples, conditions and the student step(s) behind them)."""
    batches, generate = [], obj.generate
    obj.generate = lambda: batches.append(generate()) or batches[-1]
    return batches


def no_noise(monkeypatch):
    """Zero every noise draw: a re-noised estimate then equals the estimate itself."""
    import fewstep.core.objectives.base
    import fewstep.core.sampling

    zeros = lambda shape, *args, **kwargs: torch.zeros(shape)
    monkeypatch.setattr(fewstep.core.sampling, "randn", zeros)
    monkeypatch.setattr(fewstep.core.objectives.base, "randn", zeros)


def test_backward_simulation_feeds_the_student_its_own_earlier_outputs(monkeypatch):
    setup = tiny_unet_setup("dmd2", student_steps=4)
    setup.student = Recorder(setup.student)
    obj = objectives.build("dmd2", setup)
    no_noise(monkeypatch)  # x_k must then equal the student's own output at step k-1
    x3, _ = obj.student_input(3)
    sigmas = setup.student_sigmas
    assert [sigma for _, sigma, _ in setup.student.calls] == pytest.approx(sigmas[:3])
    for (x_in, _, _), (_, _, previous) in zip(setup.student.calls[1:], setup.student.calls):
        assert torch.equal(x_in, previous)  # each simulated step starts from the one before
    assert torch.equal(x3, setup.student.calls[-1][2])
    assert not torch.equal(x3, torch.zeros_like(x3))


def test_backward_simulation_can_run_the_students_ema_weights(monkeypatch):
    from fewstep.core.training import ema_for

    setup = tiny_unet_setup("dmd2", student_steps=4, simulate_with="ema")
    ema = ema_for(setup.student, decay=0.5)
    simulator = distillation.EmaSimulator(setup.student, ema)
    for step in range(3):  # "training updates": the raw weights move, the EMA (after its warm-up) lags
        with torch.no_grad():
            for p in setup.student.parameters():
                p.add_(1.0)
        simulator.after_step(step)
    raw = [p.detach().clone() for p in setup.student.parameters()]
    ema_weights = [p.detach().clone() for p in simulator().parameters()]
    assert all(torch.equal(e, s) for e, s in zip(ema_weights, ema.shadow_params))
    assert all(torch.all(e < r) for e, r in zip(ema_weights, raw))
    assert not any(p.requires_grad for p in simulator().parameters())

    setup.simulator = simulator
    simulator.module = Recorder(simulator.module)
    setup.student = Recorder(setup.student)
    obj = objectives.build("dmd2", setup)
    no_noise(monkeypatch)
    x3, _ = obj.student_input(3)
    assert setup.student.calls == []  # the raw student never ran the earlier steps...
    assert [sigma for _, sigma, _ in simulator.module.calls] == pytest.approx(setup.student_sigmas[:3])
    assert torch.equal(x3, simulator.module.calls[-1][2])  # ...its EMA did, and step 3 starts from that


def test_all_steps_per_batch_trains_every_step_on_its_own_simulated_input(monkeypatch):
    from fewstep.families.edm.unet import per_step_labels, step_labels
    from fewstep.core.sampling import student_sample

    setup = tiny_unet_setup("dmd2", student_steps=4, batch_size=8, per_step_critic=True, steps_per_batch="all")
    setup.all_steps_per_batch = True
    per_step_labels(setup.fake, 4)
    fake = setup.fake
    setup.critic_cond = lambda cond, k: step_labels(fake, cond, k)
    spy = setup.fake = Recorder(setup.fake)
    setup.student = Recorder(setup.student)
    obj = objectives.build("dmd2", setup)
    no_noise(monkeypatch)  # a simulated input then equals the student's own output after the earlier steps
    steps = obj.generate().step
    assert steps.tolist() == [0, 1, 2, 3] * 2  # every step, evenly
    *simulated, (x, _, _) = setup.student.calls
    # step j of the simulation ran on exactly the samples that are past it: 6, 4 and 2 of the 8
    assert [len(inputs) for inputs, _, _ in simulated] == [6, 4, 2]
    cond = setup.student.conds[-1]
    with torch.no_grad():
        for k in range(1, 4):
            mine = steps == k
            expected = student_sample(setup.student.inner, torch.zeros(int(mine.sum()), 1, 8, 8), cond[mine],
                                      setup.student_sigmas[:k])
            assert torch.allclose(x[mine], expected, atol=1e-5), k
    assert torch.equal(x[steps == 0], torch.zeros_like(x[steps == 0]))
    # the fake score sees each sample with its own step's label table, in the DM and GAN terms alike
    batches = record_batches(obj)
    for loss in (obj.critic_loss, obj.generator_loss):
        spy.conds.clear()
        loss()
        assert spy.conds and all(torch.equal(seen // 11, batches[-1].step) for seen in spy.conds)


def test_ema_without_warmup_holds_its_decay():
    from fewstep.core.training import ema_for

    averages = {}
    for warmup in (True, False):
        weight = torch.nn.Parameter(torch.zeros(1))
        ema = ema_for(torch.nn.ParameterList([weight]), decay=0.9, warmup=warmup)
        for value in (1.0, 2.0, 3.0):
            weight.data.fill_(value)
            ema.step([weight])
        averages[warmup] = float(ema.shadow_params[0])
    # the first update copies; then decay 0.9 throughout, or diffusers' warm-up min(0.9, (1+n)/(10+n))
    assert averages[False] == pytest.approx(0.9 * (0.9 * 1 + 0.1 * 2) + 0.1 * 3)
    second = 2 / 11 * 1 + 9 / 11 * 2
    assert averages[True] == pytest.approx(3 / 12 * second + 9 / 12 * 3)


def test_per_step_critic_conditions_the_fake_score_on_the_step_that_made_the_samples(tmp_path):
    from fewstep.families.edm.unet import load_model, per_step_labels, save_model, step_labels, step_tables
    from fewstep.params import ParamsError

    setup = tiny_unet_setup("dmd2", student_steps=4, per_step_critic=True)
    per_step_labels(setup.fake, 4)
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.full((4,), 1.0), torch.arange(4)
    with torch.no_grad():  # every table starts as a copy of the teacher's
        assert torch.allclose(setup.fake(x, sigma, labels + 3 * 11), setup.teacher(x, sigma, labels), atol=1e-6)
    assert torch.equal(step_labels(setup.fake, labels, 3), labels + 3 * 11)
    fake = setup.fake
    setup.critic_cond = lambda cond, k: step_labels(fake, cond, k)
    spy = setup.fake = Recorder(setup.fake)
    obj = objectives.build("dmd2", setup)
    batches = record_batches(obj)
    tables = set()
    for loss in [obj.critic_loss, obj.generator_loss] * 4:
        spy.conds.clear()
        loss()
        # the student batch and (in the critic's GAN term) the real batch use the generated step's table
        assert len(batches) == 1 and spy.conds and all(torch.all(seen // 11 == batches[0].step) for seen in spy.conds)
        tables.add(batches.pop().step)
    assert len(tables) > 1

    save_model(spy.inner, tmp_path / "critic", role="critic", step_tables=4)
    loaded, _ = load_model(tmp_path / "critic")
    assert step_tables(loaded) == 4
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels + 22), spy.inner(x, sigma, labels + 22))
    with pytest.raises(ParamsError, match="per_step_critic"):
        edm_trainer.load_critic(tmp_path / "critic", setup.teacher, tables=1)


def test_without_backward_simulation_the_student_sees_noised_real_data(monkeypatch):
    setup = tiny_unet_setup("dmd2", student_steps=4, backward_simulation=False)
    setup.student = Recorder(setup.student)
    real_batches = []
    real = setup.real
    setup.real = lambda: real_batches.append(real()) or real_batches[-1]
    obj = objectives.build("dmd2", setup)
    no_noise(monkeypatch)
    x3, cond = obj.student_input(3)
    assert setup.student.calls == []  # the student never ran
    assert torch.equal(x3, real_batches[0][0]) and torch.equal(cond, real_batches[0][1])

    setup.all_steps_per_batch = True  # a batch over all steps: step 0 from noise (zero here), the others from data
    x, cond = obj.student_inputs(torch.tensor([0, 1, 2, 3]))
    assert setup.student.calls == []
    real_x, real_cond = real_batches[-1]
    assert torch.equal(x[1:], real_x[1:]) and torch.equal(cond[1:], real_cond[1:])
    assert torch.equal(x[0], torch.zeros_like(x[0]))


def test_default_student_sigmas_spread_over_the_karras_grid():
    from types import SimpleNamespace

    from fewstep.params import DistillParams

    edm = SimpleNamespace(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert edm_trainer.student_sigmas(DistillParams(student_steps=1), edm) == [80.0]
    four = edm_trainer.student_sigmas(DistillParams(student_steps=4), edm)
    assert four[0] == 80.0 and all(a > b for a, b in zip(four, four[1:])) and four[-1] > 0.002
    assert edm_trainer.student_sigmas(DistillParams(student_steps=2, student_sigmas=[50.0, 5.0]), edm) == [50.0, 5.0]


def test_real_guidance_is_null_label_cfg_on_the_teacher_in_the_dm_gradient():
    setup = tiny_unet_setup("dmd2", real_guidance=2.0)
    teacher = setup.teacher
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.full((4,), 1.5), torch.tensor([0, 3, 5, 9])
    cond, uncond = teacher(x, sigma, labels), teacher(x, sigma, torch.full_like(labels, teacher.null_label))
    torch.testing.assert_close(teacher.guided(x, sigma, labels, 2.0), uncond + 2.0 * (cond - uncond),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(teacher.guided(x, sigma, labels, 1.0), cond)

    seen = []
    guided = teacher.guided
    teacher.guided = lambda *args: seen.append(args[-1]) or guided(*args)
    obj = objectives.build("dmd2", setup)
    obj.distribution_matching(Generated(torch.randn(4, 1, 8, 8, requires_grad=True), labels, 0))
    assert seen == [2.0]  # the real score of the DM gradient is the guided teacher


def test_init_student_starts_from_a_saved_student_of_another_step_count(tmp_path):
    from fewstep.families.edm.unet import EDMDenoiser, build_unet, make_scheduler, save_model
    from fewstep.params import ParamsError

    setup = tiny_unet_setup("dmd2", student_steps=4)
    one_step = setup.student
    with torch.no_grad():
        for p in one_step.parameters():
            p.add_(0.01)  # "trained": no longer the teacher
    save_model(one_step, tmp_path / "one-step", role="student", student_sigmas=[80.0], objective="dmd2")
    loaded = edm_trainer.load_init_student(tmp_path / "one-step", setup.teacher, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), one_step.parameters()))

    from types import SimpleNamespace
    edm = SimpleNamespace(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    wider = EDMDenoiser(build_unet(8, 1, 10, widths=[16, 48], layers_per_block=1), make_scheduler(edm), 10)
    with pytest.raises(ParamsError, match=r"^distill.init_student: .* expected a student distilled from this teacher"):
        edm_trainer.load_init_student(tmp_path / "one-step", wider, "cpu")
