"""The FederatedScope host: registration, config checks, gRPC encoding, trainer hooks, parity with the simulator,
a FederatedScope-LLM run with its own data and model, and FederatedScope's GSM8K evaluator on the result.

Skipped (with the reason shown) when FederatedScope is not importable; see docs/federatedscope.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("federatedscope", reason="FederatedScope (branch llm) is not installed: FederatedScope host "
                    "tests skipped")

from federatedscope.core.auxiliaries.worker_builder import get_client_cls, get_server_cls  # noqa: E402
from federatedscope.core.configs.config import global_cfg  # noqa: E402
from federatedscope.core.message import Message as FsMessage  # noqa: E402
from federatedscope.core.monitors.monitor import Monitor  # noqa: E402
from federatedscope.register import register_worker, trainer_dict, worker_dict  # noqa: E402
from fs_host_helpers import FS_CONFIGS, checkpoint_adapter, run_fs, summary, system_metrics  # noqa: E402

from fs_gmfl.config import load_config  # noqa: E402
from fs_gmfl.core.adapter import (HEAD, adapter_parameters, adapter_state, kind_of, load_adapter_tensors,  # noqa: E402
                                  model_tensor_map)
from fs_gmfl.core.message import NUM_SAMPLES, Message, pack_bits, samples_tensor  # noqa: E402
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan  # noqa: E402
from fs_gmfl.errors import ConfigError  # noqa: E402
from fs_gmfl.hosts.common.models import build_backbone  # noqa: E402
from fs_gmfl.hosts.fs import register_all, wire  # noqa: E402
from fs_gmfl.hosts.fs.assets import write_tiny_llm_assets  # noqa: E402
from fs_gmfl.hosts.fs.builders import build_fs_data, build_fs_model  # noqa: E402
from fs_gmfl.hosts.fs.config import set_command_line  # noqa: E402
from fs_gmfl.hosts.fs.registration import KEY, RegistrationConflict, call_trainer  # noqa: E402
from fs_gmfl.hosts.fs.trainer import Assignment, FsGmflTrainer, inner_model  # noqa: E402
from fs_gmfl.hosts.fs.workers import FsGmflClient, FsGmflServer  # noqa: E402
from fs_gmfl.hosts.sim.runner import Simulation  # noqa: E402

pytestmark = pytest.mark.fs_host

BOTH_HOSTS = FS_CONFIGS / "gmfl_fedit_tiny_bert_both_hosts.yaml"
BYTE_KEYS = ("uplink_bytes", "uplink_payload_bytes", "uplink_control_bytes", "downlink_bytes",
             "downlink_payload_bytes", "downlink_control_bytes", "frozen_fraction")


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_all()


def fs_config(*opts):
    """A FederatedScope config (global_cfg with fs_gmfl registered) merged with the two-host tiny YAML and opts."""
    cfg = global_cfg.clone()
    cfg.merge_from_file(str(BOTH_HOSTS))
    cfg.merge_from_list(list(opts))
    return cfg


# -- registration and configuration ------------------------------------------------------------------
def test_register_all_is_idempotent_and_resolves_fs_gmfl_classes():
    """Twice is once; fs_gmfl methods get fs_gmfl's workers and trainer, FederatedScope's fedavg keeps its own."""
    register_all()
    register_all()
    cfg = fs_config()
    assert get_server_cls(cfg) is FsGmflServer and get_client_cls(cfg) is FsGmflClient
    assert call_trainer(cfg.trainer.type) is FsGmflTrainer and trainer_dict[KEY] is call_trainer
    fedavg = fs_config("federate.method", "fedavg", "gmfl.use", False, "trainer.type", "llmtrainer")
    assert get_server_cls(fedavg) is not FsGmflServer


def test_another_plugin_claiming_an_fs_gmfl_method_is_a_conflict():
    """A worker plug-in that also answers 'fedit' makes registration fail loudly instead of shadowing."""
    register_worker("rival", lambda method: {"client": object, "server": object} if method == "fedit" else None)
    try:
        with pytest.raises(RegistrationConflict, match="rival.*fedit"):
            register_all()
    finally:
        del worker_dict["rival"]
    register_all()


@pytest.mark.parametrize("opts, key", [
    (("gmfl.c", 2.0), "gmfl.c"),
    (("gmfl.tie_policy", "coin_flip"), "gmfl.tie_policy"),
    (("trainer.type", "general"), "trainer.type"),
    (("federate.method", "fedopt", "trainer.type", "llmtrainer"), "gmfl.use"),
    (("quantization.method", "uniform"), "quantization.method"),
    (("model.type", "/m/llama@huggingface_llm"), "model.type"),
    (("federate.method", "fedkrso", "gmfl.use", False, "train.is_enable_half", True), "train.is_enable_half"),
    (("federate.method", "fft", "gmfl.use", False, "train.is_enable_half", True), "train.is_enable_half"),
    (("federate.method", "fedhft", "gmfl.use", False, "data.client_val_fraction", 0.2, "fedhft.eval", "personalised"),
     "fedhft.eval"),
    (("faults.dropout_before", 0.2), "faults.dropout_before"),
    (("faults.straggler_fraction", 0.5, "faults.straggler_delay", 1.0), "faults.straggler_fraction"),
])
def test_invalid_settings_fail_at_config_time_naming_the_key(opts, key):
    """Check functions raise ConfigError (a ValueError) naming the key while the YAML is merged."""
    with pytest.raises(ValueError) as err:
        fs_config(*opts)
    assert isinstance(err.value, ConfigError) and err.value.key == key


FS_YAMLS = sorted(FS_CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", FS_YAMLS, ids=[str(p.relative_to(FS_CONFIGS)) for p in FS_YAMLS])
def test_shipped_federatescope_configs_pass_federatescope_checks(path):
    """Every yaml_configs/fs file merges into FederatedScope's config and passes fs_gmfl's check function."""
    set_command_line(str(path), [])
    try:
        cfg = global_cfg.clone()
        cfg.merge_from_file(str(path))
    finally:
        set_command_line(None, None)
    assert cfg.trainer.type == "fs_gmfl_llmtrainer" and cfg.federate.method in ("fedit", "ffa_lora")
    assert "{" not in cfg.federate.save_to + cfg.data.root + cfg.model.type


def test_use_false_keeps_only_use_after_freeze_and_still_converts():
    """FederatedScope deletes a disabled subtree's keys at freeze; the conversion copes."""
    from fs_gmfl.hosts.fs.config import to_run_config

    cfg = fs_config("gmfl.use", False)
    cfg.freeze(save=False, inform=False)
    assert dict(cfg.gmfl.items()) == {"use": False} or set(cfg.gmfl) <= {"use", "__cfg_check_funcs__",
                                                                           "__help_info__", "is_ready_for_run"}
    assert to_run_config(cfg).gmfl.use is False


def test_fedprox_switches_federatescopes_own_fedprox_section_on_so_mu_survives_freeze():
    """FederatedScope declares fedprox.use/fedprox.mu itself and deletes mu at freeze while use is False: the
    fedprox method turns FederatedScope's switch on, so its mu reaches the method."""
    from fs_gmfl.hosts.fs.config import to_run_config

    cfg = fs_config("federate.method", "fedprox", "fedprox.mu", 0.3)
    cfg.freeze(save=False, inform=False)
    assert cfg.fedprox.use is True and cfg.fedprox.mu == 0.3 and to_run_config(cfg).fedprox.mu == 0.3


def test_federatescopes_own_fedprox_on_its_fedavg_stays_federatescopes():
    """fedprox.use on FederatedScope's fedavg is FederatedScope's own FedProx: neither refused nor taken over."""
    cfg = fs_config("federate.method", "fedavg", "gmfl.use", False, "trainer.type", "llmtrainer", "fedprox.use", True,
                    "fedprox.mu", 0.2)
    assert (cfg.federate.method, cfg.trainer.type, cfg.fedprox.mu) == ("fedavg", "llmtrainer", 0.2)


# -- transport ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("msg_type", ["model_para", "evaluate"])
def test_payload_survives_federatescope_grpc_encoding(msg_type):
    """transform(to_list=True) -> protobuf -> parse gives back the same tensors, exactly (mask and seed too)."""
    msg = Message({"a.lora_A.weight": torch.randn(4, 8)}, {"mask": pack_bits([1, 0, 1]),
                                                            "seed": torch.tensor(2**40 + 3), NUM_SAMPLES:
                                                            samples_tensor(12)})
    content = (12, wire.encode(msg, wire.UPLINK)) if msg_type == "model_para" else wire.encode(msg, wire.UPLINK)
    request = FsMessage(msg_type=msg_type, sender=1, receiver=[0], state=3, content=content).transform(to_list=True)
    received = FsMessage()
    received.parse(request.msg)
    payload = received.content[1] if msg_type == "model_para" else received.content
    back = wire.decode(payload, expect=wire.UPLINK)
    assert torch.equal(back.tensors["a.lora_A.weight"], msg.tensors["a.lora_A.weight"])
    assert torch.equal(back.control["mask"], msg.control["mask"]) and int(back.control["seed"]) == 2**40 + 3


def test_finish_message_carries_the_global_adapter_as_a_wire_payload():
    """The server's finish message holds the global adapter as one string per tensor (FederatedScope's state dict
    would become one protobuf value per float); through gRPC encoding it decodes to the exact tensors."""
    from types import SimpleNamespace

    adapter = {"m.lora_A.weight": torch.randn(4, 576), "m.lora_B.weight": torch.randn(192, 4)}
    sent, finished = [], []
    server = object.__new__(FsGmflServer)
    server.ID, server.state, server.cur_timestamp = 0, 2, 0
    server.method = SimpleNamespace(strategy=SimpleNamespace(global_adapter=lambda: dict(adapter)))
    server._monitor = SimpleNamespace(finish_fl=lambda: finished.append(True))
    server.comm_manager = SimpleNamespace(neighbors={1: "a", 2: "b"}, send=sent.append)
    server._cfg = SimpleNamespace(federate=SimpleNamespace(mode="distributed"))
    server.finish_sent = False
    server.terminate()
    server.terminate()  # FederatedScope's loop calls it again after check_and_save: finish goes out once
    (message,) = sent
    assert finished == [True] and server.is_finish and message.msg_type == "finish" and message.receiver == [1, 2]
    assert message.count_bytes() == (4 * (4 * 576 + 192 * 4), 2 * 4 * (4 * 576 + 192 * 4))
    request = message.transform(to_list=True)
    assert len(request.msg["content"].dict_msg_stringkey.dict_value) == 3    # header + 2 tensors, no float lists
    received = FsMessage()
    received.parse(request.msg)
    back = wire.decode(received.content, expect=wire.ADAPTER).tensors
    assert back.keys() == adapter.keys() and all(torch.equal(back[k], adapter[k]) for k in adapter)


# -- trainer hooks ----------------------------------------------------------------------------------------
class SubTensorFreezing(ClientAlgorithm):
    """Test double: freezes one whole tensor (not planned) and the last 2 of 4 columns of a lora_B (masked)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def prepare(self, model, message, client_state):
        load_adapter_tensors(model, message.tensors)
        params = adapter_parameters(model)
        self.frozen_key = next(k for k in params if ".lora_A." in k)
        self.masked_key = next(k for k in params if ".lora_B." in k)
        mask = torch.zeros_like(params[self.masked_key])
        mask[:, :2] = 1.0
        return LocalPlan(model, {k: p for k, p in params.items() if k != self.frozen_key},
                         grad_masks={self.masked_key: mask},
                         frozen_values={self.masked_key: params[self.masked_key].detach().clone()},
                         after_step=self.steps.append)

    def finish(self, plan, stats, client_state):
        self.stats = stats
        return Message({k: p.detach().clone() for k, p in plan.trainable.items()},
                       {NUM_SAMPLES: samples_tensor(stats.num_samples)})


def test_trainer_freezes_through_masks_and_keeps_every_tensor_in_the_state_dict():
    """AdamW with weight decay 0.5: masked entries and the unplanned tensor stay bit-identical, the rest moves;
    afterwards requires_grad is restored, so FederatedScope's trainable-only state dict still carries all
    adapter tensors, and no gradient hook is left behind."""
    # Prepare
    cfg = fs_config("train.optimizer.weight_decay", 0.5, "train.optimizer.lr", 0.05, "train.local_update_steps", 4)
    data, cfg = build_fs_data(cfg)
    model = build_fs_model(cfg.model)
    trainer = FsGmflTrainer(model, data[1], "cpu", cfg, monitor=Monitor(cfg))
    before = adapter_state(inner_model(model))
    algorithm = SubTensorFreezing()
    trainer.assign(Assignment(algorithm, Message(before), 0, 1, {}, seed=3))
    # Execute
    trainer.train()
    uplink = trainer.take_uplink()
    # Assert
    after = adapter_state(inner_model(model))
    frozen, masked = algorithm.frozen_key, algorithm.masked_key
    assert torch.equal(after[frozen], before[frozen])
    assert torch.equal(after[masked][:, 2:], before[masked][:, 2:])
    assert not torch.equal(after[masked][:, :2], before[masked][:, :2])
    assert all(not torch.equal(after[k], before[k]) for k in after if k not in (frozen, masked))
    assert set(uplink.tensors) == set(before) - {frozen} and uplink.num_samples == 32  # 120 rows x 0.8 train / 3 clients
    assert algorithm.steps == [0, 1, 2, 3] and algorithm.stats.steps == 4
    sent = {k.replace(".default.", ".") for k in model.state_dict()}
    assert set(before) <= sent  # AdapterModel.state_dict() keeps requires_grad=True tensors only
    assert not adapter_parameters(inner_model(model))[masked]._backward_hooks
    assert {id(p) for g in trainer.ctx.optimizer.param_groups for p in g["params"]} == {
        id(p) for k, p in adapter_parameters(inner_model(model)).items() if k != frozen}


def run_both_hosts(tmp_path: Path, opts: list[str]) -> tuple[Simulation, dict]:
    """``BOTH_HOSTS`` with ``opts`` under FederatedScope (checkpoint ``fs/final_run.ckpt``, outputs ``fs/run``) and
    in the simulator (``sim/run``); returns the finished simulation and its summary."""
    fs_opts = [*opts, "outdir", str(tmp_path / "fs"), "expname", "run", "federate.save_to",
               str(tmp_path / "fs" / "run.ckpt")]
    run_fs("fs-run", "--cfg", str(BOTH_HOSTS), *fs_opts, cwd=tmp_path)
    sim = Simulation(load_config(BOTH_HOSTS, [*opts, "outdir", str(tmp_path / "sim"), "expname", "run"]),
                     quiet=True)
    return sim, sim.run()


# -- parity and bytes --------------------------------------------------------------------------------------
HEAD_KEYS = {"base_model.model.classifier.modules_to_save.weight", "base_model.model.classifier.modules_to_save.bias"}
PARITY = [pytest.param("fedit", [], [0.0, 0.5], id="fedit"),
          pytest.param("ffa_lora", ["federate.sample_client_num", "2"], [0.0, 0.5], id="ffa_lora-2-of-3-clients"),
          pytest.param("hafl", ["gmfl.use", "False"], None, id="hafl"),
          pytest.param("fedhft", ["gmfl.use", "False", "fedhft.eval", "global"], None, id="fedhft"),
          pytest.param("fedprox", ["fedprox.mu", "0.5"], [0.0, 0.5], id="fedprox"),
          pytest.param("lora_a2", ["gmfl.use", "False"], None, id="lora_a2"),
          pytest.param("fedex_lora", [], [0.0, 0.5], id="fedex_lora")]


@pytest.mark.parametrize("method, extra, frozen", PARITY)
def test_same_yaml_gives_the_same_global_adapter_and_bytes_in_both_hosts(tmp_path, method, extra, frozen,
                                                                         monkeypatch):
    """Two rounds of one YAML (GMFL freezing in round 2, dropout on; all or 2 of 3 clients per round) in the
    simulator and through FederatedScope's unmodified main: same participants, same global adapter to float
    tolerance and the same bytes, round by round."""
    # Prepare
    monkeypatch.setenv("FS_GMFL_THREADS", "1")  # FederatedScope's standalone runner trains with one thread
    opts = ["federate.method", method, *extra]
    # Execute
    sim, sim_summary = run_both_hosts(tmp_path, opts)
    # Assert
    fs_adapter = checkpoint_adapter(tmp_path / "fs" / "final_run.ckpt")
    sim_adapter = sim.method.strategy.global_adapter()
    initial = adapter_state(build_backbone(sim.cfg, 2).model)
    untrained = set(sim_adapter) - set(fs_adapter)  # FederatedScope checkpoints requires_grad tensors only
    folded = set(sim_adapter) - set(initial)  # FedEx-LoRA's base weights (residuals folded in), never trained
    assert set(fs_adapter) <= set(sim_adapter) and folded <= untrained
    assert untrained - folded == (HEAD_KEYS if method == "hafl" else set())  # HAFL leaves the head untrained
    assert len(folded) == (4 if method == "fedex_lora" else 0)  # query and value of 2 layers
    assert all(torch.equal(sim_adapter[k], initial[k]) for k in untrained - folded)
    for key, value in fs_adapter.items():
        torch.testing.assert_close(value, sim_adapter[key], rtol=0, atol=1e-6)
    moved = [k for k in initial if not torch.equal(sim_adapter[k], initial[k])]
    assert len(moved) > len(initial) // 2  # training happened (FFA-LoRA keeps every lora_A)
    fs_rows, sim_rows = summary(tmp_path / "fs" / "run")["per_round"], sim_summary["per_round"][1:]
    keys = ["clients", *(k for k in BYTE_KEYS if k in sim_rows[0])]
    assert [{k: r[k] for k in keys} for r in fs_rows] == [{k: r[k] for k in keys} for r in sim_rows]
    if frozen is not None:
        assert [r["frozen_fraction"] for r in fs_rows] == frozen


BACKBONE_PARITY = [pytest.param("fedkrso", ["fedkrso.interval", "2", "fedkrso.num_seeds", "3"], id="fedkrso"),
                   pytest.param("fedkrso", ["fedkrso.interval", "2", "fedkrso.num_seeds", "3",
                                            "fedkrso.basis", "orthogonal"], id="fedkrso-orthogonal"),
                   pytest.param("fft", [], id="fft")]


@pytest.mark.parametrize("method, extra", BACKBONE_PARITY)
def test_backbone_methods_give_the_same_global_weights_and_bytes_in_both_hosts(tmp_path, method, extra,
                                                                              monkeypatch):
    """FedKRSO (2 seeds' intervals per round) and FFT train targeted backbone weights: two rounds of one YAML give
    the same global targeted weights and head in the simulator and in FederatedScope's checkpoint, which holds
    exactly those tensors, and the same bytes round by round (FFT's: every trained tensor each way)."""
    # Prepare
    monkeypatch.setenv("FS_GMFL_THREADS", "1")
    opts = ["federate.method", method, "gmfl.use", "False", *extra]
    # Execute
    sim, sim_summary = run_both_hosts(tmp_path, opts)
    # Assert
    fs_state = checkpoint_adapter(tmp_path / "fs" / "final_run.ckpt")
    sim_global = sim.method.strategy.global_adapter()
    assert set(fs_state) == set(sim_global)  # the checkpoint holds exactly the targeted weights and the head
    assert all(torch.equal(fs_state[k], sim_global[k]) for k in sim_global)
    initial = build_backbone(sim.cfg, 2).model
    initial_values = {k: p.detach() for k, p in model_tensor_map(initial, sim_global).items()}
    weights = [k for k in sim_global if kind_of(k) != HEAD]
    assert len(weights) == sim.method.info["target_layers"] == 12  # q, k, v, 2 x dense, intermediate; 2 layers
    assert all(not torch.equal(sim_global[k], initial_values[k]) for k in weights)
    fs_rows, sim_rows = summary(tmp_path / "fs" / "run")["per_round"], sim_summary["per_round"][1:]
    keys = ["clients", *(k for k in BYTE_KEYS if k in sim_rows[0])]
    assert [{k: r[k] for k in keys} for r in fs_rows] == [{k: r[k] for k in keys} for r in sim_rows]
    if method == "fft":
        trained = 4 * sim.method.info["trained_params"]
        assert [(r["downlink_bytes"], r["uplink_bytes"]) for r in fs_rows] == [(3 * trained, 3 * (trained + 8))] * 2
    else:
        assert fedkrso_bytes(fs_rows) == [(r["downlink_bytes"], r["uplink_bytes"]) for r in fs_rows]


def fedkrso_bytes(rows: list[dict]) -> list[tuple[int, int]]:
    """The FedKRSO byte formulas (docs/methods/fedkrso.md) for the tiny BERT (b = 4, r = 4, K = 3, 3 clients,
    R = 224 output rows of the 12 targeted layers, |Phi| = 34 head parameters), from the seeds each round used
    (strategy metrics).

    Downlink per client: 8K (seeds) + 16 (schedule seed, version) + b|Phi|, plus in round 2 the replay of round 1,
    (8 + b r R) per seed used; uplink per client: b r R |U_n| + b |Phi| + |U_n| (uint8 indices) + 8 (samples).
    """
    out, replay = [], 0
    for row in rows:
        used = round(3 * row["mean_client_seeds"])  # sum of |U_n| over the 3 clients
        out.append((3 * (8 * 3 + 16 + 4 * 34 + replay), 4 * 4 * 224 * used + 3 * (4 * 34 + 8) + used))
        replay = (8 + 4 * 4 * 224) * int(row["seeds_used"])
    return out


def test_flora_gives_the_same_merged_model_and_bytes_in_both_hosts(tmp_path, monkeypatch):
    """FLoRA, client 0 at rank 2 and clients 1-2 at rank 4 (the model shared by every standalone client): two rounds
    of one YAML give the same merged global model in the simulator and in FederatedScope's checkpoint, which holds
    exactly the merged base weights W0 + D, the zero LoRA factors and the head, and the same bytes round by round
    (round 2's downlink adds the dense merged updates, 4 x 16 x 16 fp32 values per client)."""
    # Prepare
    monkeypatch.setenv("FS_GMFL_THREADS", "1")
    opts = ["federate.method", "flora", "gmfl.use", "False",
            "flora.profiles", "[{'clients': [0], 'rank': 2}, {'clients': [1, 2], 'rank': 4}]"]
    # Execute
    sim, sim_summary = run_both_hosts(tmp_path, opts)
    # Assert
    fs_state = checkpoint_adapter(tmp_path / "fs" / "final_run.ckpt")
    sim_global = sim.method.strategy.global_adapter()
    assert set(fs_state) == set(sim_global)
    for key, value in fs_state.items():
        torch.testing.assert_close(value, sim_global[key], rtol=0, atol=1e-6)
    initial = build_backbone(sim.cfg, 2).model
    initial_values = {k: p.detach() for k, p in model_tensor_map(initial, sim_global).items()}
    merged = [m.weight_name for m in sim.method.strategy.modules]
    assert len(merged) == 4 and all(not torch.equal(sim_global[k], initial_values[k]) for k in merged)
    fs_rows, sim_rows = summary(tmp_path / "fs" / "run")["per_round"], sim_summary["per_round"][1:]
    keys = ["clients", *(k for k in BYTE_KEYS if k in sim_rows[0])]
    assert [{k: r[k] for k in keys} for r in fs_rows] == [{k: r[k] for k in keys} for r in sim_rows]
    assert [r["downlink_bytes"] for r in fs_rows] == [3 * 146, 3 * (146 + 4 * 16 * 16 * 4)]


# -- FederatedScope's own data and model types, and its evaluation script -------------------------------
@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return write_tiny_llm_assets(tmp_path_factory.mktemp("assets"))


def native_opts(assets: Path, out: Path) -> list[str]:
    return ["data.root", str(assets), "model.type", f"{assets}@huggingface_llm", "outdir", str(out),
            "federate.save_to", str(out / "gmfl.ckpt")]


@pytest.fixture(scope="module")
def native_run(tiny_llm, tmp_path_factory):
    """FedIT + GMFL (4 rounds) on a tiny Llama with FederatedScope's instruction-JSON data and meta splitter."""
    out = tmp_path_factory.mktemp("native")
    opts = native_opts(tiny_llm, out / "out")
    run_fs("fs-run", "--cfg", str(FS_CONFIGS / "gmfl_fedit_tiny_llama.yaml"), *opts, cwd=out)
    return out, opts


def test_federatedscope_llm_run_with_its_own_data_and_model(native_run):
    """Exact bytes per round in summary.json and in FederatedScope's monitor; GMFL halves the uplink after
    round 2; FederatedScope saves the best and final checkpoints with every LoRA tensor."""
    out, _ = native_run
    run_dir = out / "out" / "gmfl_fedit_tiny_llama"
    rows = summary(run_dir)["per_round"]
    # LoRA r=4 on q_proj, v_proj of 2 layers (hidden 64): 8 tensors x 256 params x 4 B = 8,192 B per client
    assert [r["uplink_bytes"] for r in rows] == [3 * (8192 + 8)] * 2 + [3 * (4096 + 8)] * 2
    assert [r["downlink_bytes"] for r in rows] == [3 * 8192] * 2 + [3 * (8192 + 1)] * 2
    assert [r["frozen_fraction"] for r in rows] == [0.0, 0.0, 0.5, 0.5]
    metrics = system_metrics(run_dir)
    assert [metrics[c]["total_upload_bytes"] for c in (1, 2, 3)] == [2 * 8200 + 2 * 4104] * 3
    final = checkpoint_adapter(out / "out" / "final_gmfl.ckpt")
    assert len(final) == 8 and set(final) == set(checkpoint_adapter(out / "out" / "gmfl.ckpt"))


@pytest.mark.slow
def test_federatedscope_gsm8k_evaluator_runs_offline_on_the_result(native_run):
    """FederatedScope's GSM8K script loads the run's checkpoint on CPU and scores a local gsm8k_test.jsonl."""
    out, opts = native_run
    evaluation = run_fs("fs-eval", "gsm8k", "--cfg", str(FS_CONFIGS / "gmfl_fedit_tiny_llama.yaml"), *opts,
                        "expname", "gsm8k_eval", cwd=out)
    assert "Num of total question: 2, correct num:" in evaluation.stdout
    assert "will use raw model" not in evaluation.stdout  # the federated checkpoint was loaded


def test_gsm8k_evaluator_asks_in_the_training_template(native_run):
    """``--prompt training``: the same questions and scorer, each asked in FederatedScope's Alpaca template; the
    option never reaches FederatedScope's own argument parser."""
    out, opts = native_run
    evaluation = run_fs("fs-eval", "gsm8k", "--cfg", str(FS_CONFIGS / "gmfl_fedit_tiny_llama.yaml"), *opts,
                        "expname", "gsm8k_training_prompt", "--prompt", "training", cwd=out)
    assert "Num of total question: 2, correct num:" in evaluation.stdout
    assert "will use raw model" not in evaluation.stdout
