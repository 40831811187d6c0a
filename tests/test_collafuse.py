"""CollaFuse: routing by timestep, what travels, split inference, the edge cuts, the audit, bad uploads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

from fedapp.config import ConfigError, parse_config
from fedapp.data.pixels import to_model_range, to_uint8
from fedapp.eval.disclosure import audit_upload, denoiser_reconstruction, similarity
from fedapp.model.build import build_diffusion, build_model
from fedapp.model.diffusion import Diffusion
from fedapp.model.unet import build_unet
from fedapp.protocol.keys import sample_seeds
from fedapp.protocol.records import decode_array, decode_record, upload_to_record
from fedapp.runs.node_state import load_node_model, sampling_weights
from fedapp.train.collafuse import Upload, chain_split, client_round, server_half, server_steps, split_sample
from fedapp.train.ema import ema_weights, make_ema
from fedapp.train.optim import Recipe, Stepper
from strategies import CollaFuse, build_strategy
from tests.support.inprocess import run_inprocess, tiny_config
from tests.support.mocks import reply_from

pytestmark = pytest.mark.usefixtures("task_identity")

COLLAFUSE = {"strategy.name": "collafuse", "train.rounds": 2, "eval.every": 1, "eval.num-samples": 4,
             "eval.sampler-steps": 10, "collafuse.audit-samples": 8}


class SpyModel(nn.Module):
    """A UNet that records every timestep it is trained or evaluated on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.detach().cpu())
        return self.inner(x, t)


def _images(n: int = 96, side: int = 28) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return build_unet(8, (1, 2), 1, 28)


# --------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("cut", [1, 300, 700, 999])
def test_routing_by_timestep_is_exact(cut: int) -> None:
    diffusion = Diffusion(1000)
    client = SpyModel(_tiny_unet())
    done, upload = client_round(client, diffusion, _images(), cut, epochs=2, batch_size=16, recipe=Recipe(1e-3), seed=3,
                                device=torch.device("cpu"), upload_cap=10_000)
    trained = torch.cat(client.seen) if client.seen else torch.empty(0, dtype=torch.long)
    assert len(trained) == done.own.images and (trained < cut).all()
    assert (upload.t >= cut).all() and (upload.t < 1000).all()
    assert done.own.images + len(upload) == done.drawn == 2 * 96  # every draw went exactly one way

    server = SpyModel(_tiny_unet())
    stepper = Stepper(dict(server.named_parameters()), Recipe(1e-3))
    result = server_steps(server, stepper, diffusion, upload.x_t, upload.t, upload.target, epochs=1,
                          batch_size=32, seed=0, device=torch.device("cpu"))
    assert result.images == len(upload)
    seen = torch.cat(server.seen) if server.seen else torch.empty(0, dtype=torch.long)
    assert torch.equal(seen.sort().values, upload.t.sort().values)


def test_upload_is_capped_and_the_x0_it_came_from_is_kept() -> None:
    diffusion = Diffusion(1000)
    done, upload = client_round(_tiny_unet(), diffusion, _images(), 0, epochs=3, batch_size=16, recipe=Recipe(1e-3), seed=0,
                                device=torch.device("cpu"), upload_cap=40)
    assert len(upload) == 40 and done.own.images == 0 and done.own.steps == 0
    assert done.drawn == 48  # c = 0: it stops drawing once the upload is full
    rebuilt = diffusion.scheduler.add_noise(upload.x0, upload.target, upload.t)
    assert torch.allclose(rebuilt, upload.x_t, atol=1e-6)


def test_cut_is_round_c_times_t_and_out_of_range_ratios_are_refused() -> None:
    assert parse_config({"collafuse.cut-ratio": 0.2}).collafuse.cut(1000) == 200
    assert parse_config({"collafuse.cut-ratio": 1.0}).collafuse.cut(1000) == 1000
    assert parse_config({"collafuse.cut-ratio": 0.0}).collafuse.cut(50) == 0
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="collafuse.cut-ratio"):
            parse_config({"collafuse.cut-ratio": bad})


def test_the_chain_split_counts_every_grid_step_once() -> None:
    diffusion = Diffusion(1000)
    for kind, steps in (("ddpm", None), ("ddpm", 50), ("ddim", 25)):
        for cut in (0, 200, 510, 1000):
            server, client = chain_split(diffusion, cut, kind, steps)  # type: ignore[arg-type]
            assert server + client == (steps or 1000)
    assert chain_split(Diffusion(1000), 200, "ddpm", 50) == (40, 10)


# ------------------------------------------------------------------ whole runs, in process
def test_client_models_and_images_never_travel(tmp_path: Path) -> None:
    run, _, _ = run_inprocess(tmp_path, nodes=3, **COLLAFUSE, **{"collafuse.cut-ratio": 0.5})
    client_keys = set(build_model(run.cfg).state_dict())
    travelled = [(m.metadata.message_type, set(r.keys())) for m in run.sent + run.replies
                 for r in m.content.array_records.values()]
    assert {kind for kind, _ in travelled} == {"evaluate.collafuse", "train.collafuse"}
    assert all(not keys & client_keys for _, keys in travelled), "a model weight travelled"
    for msg in run.sent:
        if msg.metadata.message_type == "train.collafuse":
            assert not msg.content.array_records, "training messages carry no weights down"
    saved = [load_node_model(run.state_dir(node)) for node in run.node_ids]
    own = [t for payload in saved for t in payload["model"].values() if t.numel() > 1]  # type: ignore[index, union-attr]
    for msg in run.sent + run.replies:
        for record in msg.content.array_records.values():
            for array in decode_record(record).values():
                assert not any(array.shape == t.shape and torch.equal(array, t) for t in own)
    # and no uploaded x_t is a real image: the client's x0 stays home
    train_images = {to_model_range(img).flatten().numpy().tobytes() for img in _partition_images(run)}
    for reply in run.replies:
        if "upload" in reply.content.array_records:
            for x in decode_array(reply.content["upload"]["x-t"]):
                assert x.flatten().numpy().tobytes() not in train_images


def _partition_images(run) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from fedapp.data.share import local_data
    cfg = run.cfg
    return torch.cat([local_data(cfg.data, cfg.seed, i, len(run.node_ids)).train.images
                      for i in range(len(run.node_ids))])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_split_inference_equals_both_models_back_to_back(tmp_path: Path, sampler: str) -> None:
    run, _, _ = run_inprocess(tmp_path, nodes=2, **COLLAFUSE, **{"collafuse.cut-ratio": 0.3, "eval.sampler": sampler})
    cfg, diffusion = run.cfg, build_diffusion(run.cfg)
    server = build_model(cfg)
    server.load_state_dict(run.strategy.ema_state()["weights"])  # type: ignore[index]  # what checkpoints sample with
    replies = [m for m in run.replies if m.metadata.message_type == "evaluate.collafuse"][-2:]
    for reply in replies:
        node = reply.metadata.src_node_id
        client = build_model(cfg)
        client.load_state_dict(sampling_weights(load_node_model(run.state_dir(node))))  # type: ignore[arg-type]
        server_seed, client_seed = sample_seeds(cfg.seed, 2, int(reply.content["metrics"]["partition-id"]))
        n = max(cfg.eval.metric_samples, cfg.eval.num_samples)
        expected = split_sample(server, client, diffusion, n, (1, 28, 28), 300, kind=sampler,  # type: ignore[arg-type]
                                steps=cfg.eval.sampler_steps, server_seed=server_seed, client_seed=client_seed,
                                device=torch.device("cpu"), batch_size=cfg.eval.batch_size)
        got = decode_array(reply.content["samples"]["images"])
        assert torch.equal(got, to_uint8(expected[: cfg.eval.num_samples]))
    report = run.strategy.round_report(2)
    server_steps_, client_steps_ = chain_split(diffusion, 300, sampler, 10)  # type: ignore[arg-type]
    assert report["client-share"]["infer-steps"] == pytest.approx(client_steps_ / 10)  # type: ignore[index]
    assert server_steps_ == 7


def test_cut_ratio_zero_is_one_server_model_trained_on_every_client(tmp_path: Path) -> None:
    run, initial, final = run_inprocess(tmp_path, nodes=3, **COLLAFUSE, **{"collafuse.cut-ratio": 0.0})
    uploads = [m for m in run.replies if m.metadata.message_type == "train.collafuse"]
    assert all(dict(m.content["metrics"])["client-samples"] == 0 for m in uploads)
    assert all("train-loss" not in dict(m.content["metrics"]) for m in uploads)  # no loss over no images
    assert all(len(decode_array(m.content["upload"]["t"])) > 0 for m in uploads)
    assert any(not torch.equal(decode_array(initial[k]), decode_array(final[k])) for k in initial.keys())
    seeded = build_model(run.cfg, seed=run.cfg.seed).state_dict()
    for node in run.node_ids:  # the clients' models own nothing and were never trained
        state = load_node_model(run.state_dir(node))["model"]  # type: ignore[index]
        assert all(torch.equal(state[k], v) for k, v in seeded.items())  # type: ignore[index]
    share = run.strategy.round_report(2)["client-share"]
    assert share["train-samples"] == 0.0 and share["infer-steps"] == 0.0  # type: ignore[index]


def test_cut_ratio_one_is_every_client_alone(tmp_path: Path) -> None:
    run, initial, final = run_inprocess(tmp_path, nodes=3, **COLLAFUSE, **{"collafuse.cut-ratio": 1.0})
    for m in run.replies:
        if m.metadata.message_type == "train.collafuse":
            assert len(decode_array(m.content["upload"]["t"])) == 0
    assert all(torch.equal(decode_array(initial[k]), decode_array(final[k])) for k in initial.keys())
    share = run.strategy.round_report(2)["client-share"]
    assert share["train-samples"] == 1.0 and share["infer-steps"] == 1.0  # type: ignore[index]
    evals = [m for m in run.replies if m.metadata.message_type == "evaluate.collafuse"]
    assert all("audit-denoise-mse" not in m.content["metrics"] for m in evals)  # nothing was disclosed
    last = [m for m in run.replies if m.metadata.message_type == "train.collafuse"][-3:]
    _, metrics = run.strategy.aggregate_train(3, last)
    assert metrics is not None and metrics["server-steps"] == 0 and "server-train-loss" not in metrics
    assert run.strategy.ema_state() is None  # its EMA never stepped: checkpoints sample the model's own weights


def test_server_optimizer_persists_across_rounds(tmp_path: Path) -> None:
    run, _, _ = run_inprocess(tmp_path, nodes=2, **{**COLLAFUSE, "collafuse.cut-ratio": 0.2, "train.rounds": 3})
    steps = sum(int(dict(m.content["metrics"])["upload-samples"]) for m in run.replies
                if m.metadata.message_type == "train.collafuse")
    assert steps > 0
    state = run.strategy.state()["optimizer"]  # type: ignore[index]
    expected = sum(-(-s // run.cfg.train.batch_size) for s in _server_samples_per_round(run))
    assert state["steps"] == expected  # the warm-up's count
    assert int(next(iter(state["moments"].values()))["step"]) == expected  # Adam's own


def test_the_servers_ema_takes_every_step_samples_the_servers_half_and_survives_a_checkpoint(tmp_path: Path) -> None:
    run, _, _ = run_inprocess(tmp_path, nodes=2, **{**COLLAFUSE, "collafuse.cut-ratio": 0.3, "train.ema-decay": 0.9})
    strategy, cfg, diffusion = run.strategy, run.cfg, build_diffusion(run.cfg)
    assert strategy.ema.optimization_step == strategy.state()["optimizer"]["steps"] > 1  # type: ignore[index]
    averaged = build_model(cfg)
    averaged.load_state_dict(ema_weights(strategy.ema, strategy.model))
    assert any(not torch.equal(a, b) for a, b in zip(averaged.parameters(), strategy.model.parameters()))
    sent = [m for m in run.sent if m.metadata.message_type == "evaluate.collafuse"][-1]
    pid = next(int(dict(r.content["metrics"])["partition-id"]) for r in run.replies
               if r.metadata.src_node_id == sent.metadata.dst_node_id)
    server_seed, _ = sample_seeds(cfg.seed, 2, pid)
    half = {name: server_half(net, diffusion, max(cfg.eval.metric_samples, cfg.eval.num_samples), (1, 28, 28), 300,
                              kind=cfg.eval.sampler, steps=cfg.eval.sampler_steps, seed=server_seed,
                              device=torch.device("cpu"), batch_size=cfg.eval.batch_size)
            for name, net in (("ema", averaged), ("raw", strategy.model))}
    got = decode_array(sent.content["split"]["x-cut"])
    assert torch.equal(got, half["ema"]) and not torch.equal(got, half["raw"])
    resumed = build_strategy(cfg)  # what fedapp resume builds, then fills from the checkpoint
    resumed.restore_ema(strategy.ema_state())  # type: ignore[attr-defined]
    assert resumed.ema.optimization_step == strategy.ema.optimization_step  # type: ignore[attr-defined]
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.shadow_params, strategy.ema.shadow_params))  # type: ignore[attr-defined]


def test_server_steps_step_the_ema_they_are_given() -> None:
    server = _tiny_unet()
    initial = [p.detach().clone() for p in server.parameters()]
    ema = make_ema(server, parse_config({"train.ema-decay": 0.99}).train)
    assert ema is not None
    gen = torch.Generator().manual_seed(0)
    x_t, target = torch.randn(40, 1, 28, 28, generator=gen), torch.randn(40, 1, 28, 28, generator=gen)
    result = server_steps(server, Stepper(dict(server.named_parameters()), Recipe(1e-3)), Diffusion(1000), x_t,
                          torch.randint(0, 1000, (40,), generator=gen), target, epochs=1, batch_size=16, seed=0,
                          device=torch.device("cpu"), ema=ema)
    assert ema.optimization_step == result.steps == 3
    pairs = list(zip(ema.shadow_params, server.parameters(), initial))
    assert any(not torch.equal(shadow, trained) for shadow, trained, _ in pairs)  # an average, not a copy
    assert any(not torch.equal(shadow, start) for shadow, _, start in pairs)  # of the steps taken


def _server_samples_per_round(run) -> list[int]:  # type: ignore[no-untyped-def]
    per_round: dict[int, int] = {}
    for sent, reply in zip(run.sent, run.replies):
        if reply.metadata.message_type == "train.collafuse":
            r = int(sent.content["config"]["server-round"])
            per_round[r] = per_round.get(r, 0) + int(dict(reply.content["metrics"])["upload-samples"])
    return [per_round[r] for r in sorted(per_round)]


# ------------------------------------------------------------------------------ the audit
def test_solving_for_x0_from_what_the_server_receives_is_exact() -> None:
    diffusion = Diffusion(1000)
    x0 = to_model_range(_images(32))
    gen = torch.Generator().manual_seed(1)
    x_t, t, eps = diffusion.noised(x0, (0, 1000), gen)
    audit = audit_upload(diffusion, x_t, t, eps, x0)
    assert audit["audit-solve-mse"] < 1e-8 and audit["audit-solve-ssim"] > 0.9999
    assert audit["audit-xt-mse"] > 0.1  # x_t itself is far from x0 on average
    # float16 on the wire: the solve gets worse as t grows (it divides by sqrt(alpha_bar_t))
    late = torch.full((32,), 990)
    x_late = diffusion.scheduler.add_noise(x0, eps, late)
    half = audit_upload(diffusion, x_late.half().float(), late, eps.half().float(), x0)
    assert half["audit-solve-mse"] > 1e-6
    assert similarity(x0, x0, "same")["same-ssim"] == pytest.approx(1.0, abs=1e-5)


class OracleEps(nn.Module):
    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps


def test_denoiser_reconstruction_with_a_perfect_denoiser_recovers_x0() -> None:
    diffusion = Diffusion(1000)
    x0 = to_model_range(_images(16))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.full((16,), 400)
    x_t = diffusion.scheduler.add_noise(x0, eps, t)
    rebuilt = denoiser_reconstruction(OracleEps(eps), diffusion, x_t, t, batch_size=16)
    assert torch.allclose(rebuilt, x0, atol=1e-4)
    blind = denoiser_reconstruction(OracleEps(torch.zeros_like(eps)), diffusion, x_t, t, batch_size=16)
    assert similarity(blind, x0, "b")["b-mse"] > similarity(rebuilt, x0, "r")["r-mse"] + 0.01


# ----------------------------------------------------------------------- bad uploads
def _strategy(tmp_path: Path) -> CollaFuse:
    strategy = build_strategy(tiny_config(tmp_path, **{"strategy.name": "collafuse", "collafuse.cut-ratio": 0.5,
                                                       "collafuse.upload-samples": 8}))
    assert isinstance(strategy, CollaFuse)
    return strategy


def _upload_reply(node: int, n: int = 4, t_lo: int = 500, **change: object) -> Message:
    gen = torch.Generator().manual_seed(node)
    upload = Upload(x_t=torch.randn(n, 1, 28, 28, generator=gen), t=torch.randint(t_lo, 1000, (n,), generator=gen),
                    target=torch.randn(n, 1, 28, 28, generator=gen), x0=torch.zeros(n, 1, 28, 28))
    record = upload_to_record(upload)
    for key, value in change.items():
        if value is None:
            del record[key]
        else:
            record[key] = value  # type: ignore[assignment]
    content = RecordDict({"upload": record, "metrics": MetricRecord({"num-examples": 10, "partition-id": node})})
    return reply_from(node, content, message_type="train.collafuse")


def test_bad_uploads_are_dropped_and_the_good_ones_train_the_server(tmp_path: Path) -> None:
    from flwr.app import Array
    strategy = _strategy(tmp_path)
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    nan = torch.randn(4, 1, 28, 28)
    nan[0, 0, 0, 0] = float("nan")
    bad = [
        _upload_reply(2, **{"x-t": Array(nan.numpy())}),
        _upload_reply(3, **{"target": Array(torch.randn(4, 1, 28, 27).numpy())}),
        _upload_reply(4, t_lo=0),  # timesteps the clients own
        _upload_reply(5, n=9),  # more than upload-samples
        _upload_reply(6, target=None),
    ]
    for reply in bad:
        assert strategy.upload_problem(reply.content) is not None
    arrays, metrics = strategy.aggregate_train(1, [_upload_reply(1), *bad])
    assert arrays is not None and metrics is not None and metrics["server-samples"] == 4
    after = strategy.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert strategy.aggregate_train(2, bad) == (None, None)


def test_a_reply_without_a_positive_integer_weight_is_dropped(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    reply = _upload_reply(1)
    reply.content["metrics"]["num-examples"] = 1.5
    assert "num-examples" in str(strategy.upload_problem(reply.content))
    empty = ArrayRecord()
    assert strategy.upload_problem(RecordDict({"upload": empty, "metrics": MetricRecord({"num-examples": 3})}))


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_withholding_the_target_leaks_it_through_the_loss_gradient(loss: str) -> None:
    """The variant where the client keeps ε and returns dL/dε̂: the server still solves for ε."""
    from scripts.collafuse_gradient_leak import target_from_loss_gradient
    diffusion = Diffusion(1000, loss=loss)  # type: ignore[arg-type]
    x0 = to_model_range(_images(8))
    x_t, t, eps = diffusion.noised(x0, (200, 1000), torch.Generator().manual_seed(3))
    prediction = _tiny_unet()(x_t, t).detach().requires_grad_(True)
    diffusion.criterion(prediction, eps).backward()
    recovered = target_from_loss_gradient(prediction.detach(), prediction.grad, loss)  # type: ignore[arg-type]
    close = (prediction.detach() - eps).abs() < 1
    if loss == "mse":
        assert torch.allclose(recovered, eps, atol=1e-4)
    else:
        assert torch.allclose(recovered[close], eps[close], atol=1e-4) and close.float().mean() > 0.5
        assert not torch.allclose(recovered[~close], eps[~close], atol=1e-4)


def test_the_gradient_variant_audit_rebuilds_x0_with_mse() -> None:
    from scripts.collafuse_gradient_leak import gradient_variant_audit
    x0 = to_model_range(_images(16))
    result = gradient_variant_audit(_tiny_unet(), Diffusion(1000, loss="mse"), x0, (200, 1000), batch_size=8)
    assert result["gradient-exact-fraction"] > 0.99
    assert result["gradient-mse"] < 1e-4 and result["solve-mse"] < 1e-8
    assert result["denoise-mse"] > 0.01  # an untrained denoiser alone rebuilds little
