"""The Flower integration with real Flower objects in one process: ``ClientApp``s with
``noise_mod``, ``Message``/``RecordDict``/``ArrayRecord``/``MetricRecord``, and the
message-API ``FedAvg`` driven by ``Strategy.start`` over :class:`LoopbackGrid`, a
``flwr.serverapp.Grid`` that hands each message to the node's ClientApp in this process
(no network at all). Flower's own in-process path, ``flwr.simulation.run_simulation``,
has only the Ray backend, and Ray (the ``flwr[simulation]`` extra) is not installed here.

Three float64 clients of 5, 7 and 11 samples with shifted data; each round's
decomposition must equal ``stats.clients.decompose`` on brute-force per-sample gradients
and, for a census (the whole client data, ``population = N_k``), the exact population
values of ``reference.client_population_stats`` at the weights the clients received.
"""
import copy
import math
import subprocess
import sys
import uuid

import pytest

flwr = pytest.importorskip("flwr")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAvg, Strategy  # noqa: E402

import reference as ref  # noqa: E402
from gradnoise import GradNoiseError  # noqa: E402
from gradnoise.integrations import flower as gf  # noqa: E402
from gradnoise.integrations.flower import NoiseStrategy, aggregate_train_metrics, fedsgd_sq_norm, noise_mod  # noqa: E402
from gradnoise.stats.clients import client_moments, decompose  # noqa: E402

SIZES = (5, 7, 11)
LR = 0.1
REL = 1e-9
KEYS = (("within", "within"), ("between", "between"), ("trace_cov_total", "total"),
        ("grad_sq_norm", "grad_sq_norm"), ("dissimilarity_sq", "dissimilarity_sq"))


def mse(out, y):
    """Mean over the batch of each sample's mean squared error: ``reduction="mean"``."""
    return F.mse_loss(out, y)


def make_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def client_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64) + k,
             torch.randn(n, 2, generator=g, dtype=torch.float64) + 2 * k - 1) for k, n in enumerate(SIZES)]


DATA = client_data()


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """The process identity Flower's runtime sets before a ServerApp runs (Message() reads it)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity  # recent Flower
    except ImportError:
        return
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class LoopbackGrid(Grid):
    """Delivers each message (a deep copy, as serialisation would make) to its node's
    ClientApp in this process; an exception becomes an error reply, as in Flower's runtime."""

    def __init__(self, apps):
        self.apps = apps  # node id -> ClientApp
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": k},
                                      state=RecordDict(), run_config={}) for k, nid in enumerate(apps)}
        self.replies = {}
        self._run = None

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.apps)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            delivered = Message(copy.deepcopy(msg.content), metadata=copy.deepcopy(msg.metadata))
            nid = msg.metadata.dst_node_id
            try:
                reply = self.apps[nid](delivered, self.contexts[nid])
            except Exception as e:  # noqa: BLE001 - the runtime's behaviour
                reply = Message(Error(code=0, reason=repr(e)), reply_to=delivered)
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def client_app(seen, mods=(), fedsgd=False):
    """A ClientApp whose train function records the received weights, then trains (one
    full-batch SGD step, or two minibatch steps) and replies with weights and metrics."""
    net = make_net(seed=5)  # its own model: the mod must not rely on sharing it
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg, context):
        k = context.node_config["partition-id"]
        x, y = DATA[k]
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        seen.append((msg.content["config"]["server-round"], k, copy.deepcopy(net.state_dict())))
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        batches = [(x, y)] if fedsgd else [(x[:3], y[:3]), (x[3:], y[3:])]
        for xb, yb in batches:
            opt.zero_grad()
            loss = mse(net(xb), yb)
            loss.backward()
            opt.step()
        metrics = MetricRecord({"num-examples": len(x), "train_loss": float(loss.detach())})
        return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        k = context.node_config["partition-id"]
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": SIZES[k], "eval": 1.0})}), reply_to=msg)

    return app


def measuring_mod(census=True, **kw):
    return noise_mod(make_net(seed=9), mse, lambda ctx: DATA[ctx.node_config["partition-id"]],
                     population=(lambda ctx: SIZES[ctx.node_config["partition-id"]]) if census else None, **kw)


def run(strategy, apps, rounds=2):
    initial = ArrayRecord(make_net().state_dict())
    return strategy.start(grid=LoopbackGrid(apps), initial_arrays=initial, num_rounds=rounds)


def fedavg(**kw):
    return FedAvg(min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3, **kw)


def oracle_round(seen, server_round, census=True):
    """(population truth, decompose on brute-force per-sample gradients) at the weights
    the clients received in ``server_round``."""
    states = {k: s for r, k, s in seen if r == server_round}
    assert sorted(states) == [0, 1, 2]
    for k in (1, 2):  # every client received the same global weights
        assert all(torch.equal(states[0][n], states[k][n]) for n in states[0])
    net = make_net()
    net.load_state_dict(states[0])
    rows = []
    for x, y in DATA:
        grads = ref.per_sample_grads(net, mse, x, y)
        rows.append(torch.cat([g.flatten(1) for g in grads.values()], 1))
    direct = decompose([client_moments(r.pow(2).sum(), r.mean(0), r.shape[0], r.shape[0] if census else None)
                        for r in rows])
    return ref.client_population_stats(rows), direct


def assert_same(noise, truth, direct, rel=REL):
    assert noise.ok, noise.reason
    for attr, key in KEYS:
        got = getattr(noise, attr)
        assert got == pytest.approx(getattr(direct, attr), rel=rel), attr
        if truth is not None:
            assert got == pytest.approx(truth[key], rel=rel), attr
    # FedAvg samples the nodes in random order
    assert sorted(noise.weights) == pytest.approx([n / sum(SIZES) for n in SIZES], rel=1e-15)
    assert sorted(noise.sizes) == list(SIZES)


# ------------------------------------------------------------------------ the rounds
@pytest.mark.parametrize("census", [True, False])
def test_rounds_match_decompose_and_population_oracle(census):
    seen = []
    app = client_app(seen, [measuring_mod(census)])
    strategy = NoiseStrategy(fedavg())
    assert isinstance(strategy, Strategy)
    result = run(strategy, {11: app, 22: app, 33: app})

    assert [h.server_round for h in strategy.history] == [1, 2]
    assert strategy.last is strategy.history[-1] and set(strategy.last.node_ids) == {11, 22, 33}
    for h in strategy.history:
        truth, direct = oracle_round(seen, h.server_round, census)
        assert_same(h.noise, truth if census else None, direct)
        assert h.noise.dissimilarity_sq > 1.5  # the shifted clients really differ
        m = result.train_metrics_clientapp[h.server_round]
        assert m["gradnoise.within"] == h.noise.within and m["gradnoise.between"] == h.noise.between
        assert m["gradnoise.ok"] == 1 and m["gradnoise.clients"] == 3
        assert "train_loss" in m and not {"gradnoise.n", "gradnoise.sum_sq", "gradnoise.mean_sq"} & set(m)
    # nothing of gradnoise reaches the global model or the evaluate round
    assert set(result.arrays.keys()) == set(make_net().state_dict())
    for m in result.evaluate_metrics_clientapp.values():
        assert not any(k.startswith("gradnoise.") for k in m)


def test_mod_keeps_gradients_and_passes_other_messages():
    net = make_net(seed=9)
    sentinel = [torch.full_like(p, 7.0) for p in net.parameters()]
    for p, s in zip(net.parameters(), sentinel):
        p.grad = s
    mod = noise_mod(net, mse, lambda ctx: DATA[0])
    content = RecordDict({"arrays": ArrayRecord(make_net().state_dict()), "metrics": MetricRecord({"num-examples": 5})})
    msg = Message(content, 1, "train")
    msg.metadata.__dict__["_message_id"] = "m1"
    reply = mod(msg, None, lambda m, c: Message(RecordDict({"arrays": ArrayRecord(net.state_dict()),
                                                            "metrics": MetricRecord({"num-examples": 5})}), reply_to=m))
    assert all(p.grad is s for p, s in zip(net.parameters(), sentinel))
    got = reply.content["metrics"]
    assert got["gradnoise.n"] == 5 and "gradnoise.population" not in got
    assert {k for k in reply.content["arrays"].keys() if k.startswith("gradnoise.")} == {
        "gradnoise.mean_grad/" + n for n, _ in net.named_parameters()}
    ev = Message(RecordDict({"arrays": ArrayRecord(make_net().state_dict())}), 1, "evaluate")
    out = mod(ev, None, lambda m, c: "untouched")
    assert out == "untouched"


def test_mod_refuses_weights_that_do_not_fit():
    mod = noise_mod(nn.Linear(4, 2).double(), mse, lambda ctx: DATA[0])
    msg = Message(RecordDict({"arrays": ArrayRecord(make_net().state_dict())}), 1, "train")
    with pytest.raises(GradNoiseError, match="does not fit"):
        mod(msg, None, lambda m, c: m)


# ------------------------------------------------------------ without mean gradients
def test_fedsgd_update_gives_the_aggregate():
    seen = []
    app = client_app(seen, [measuring_mod(send_mean_grad=False)], fedsgd=True)
    strategy = NoiseStrategy(fedavg(fraction_evaluate=0.0), aggregate_sq_norm=fedsgd_sq_norm(LR))
    run(strategy, {1: app, 2: app, 3: app})
    for h in strategy.history:
        truth, direct = oracle_round(seen, h.server_round)
        assert_same(h.noise, truth, direct, rel=1e-7)


def test_scalars_only_keep_within_and_flag_the_rest():
    seen = []
    app = client_app(seen, [measuring_mod(send_mean_grad=False)])
    strategy = NoiseStrategy(fedavg(fraction_evaluate=0.0))
    with pytest.warns(RuntimeWarning, match="no_aggregate"):
        result = run(strategy, {1: app, 2: app, 3: app}, rounds=1)
    noise = strategy.last.noise
    truth, _ = oracle_round(seen, 1)
    assert noise.flag == gf.FLAG_NO_AGGREGATE and "no mean gradients" in noise.reason
    assert noise.within == pytest.approx(truth["within"], rel=REL)
    assert math.isnan(noise.between) and math.isnan(noise.dissimilarity_sq)
    assert result.train_metrics_clientapp[1]["gradnoise.ok"] == 0


# ------------------------------------------------------------ missing or corrupt metrics
def test_a_client_without_the_mod_flags_the_round_and_training_goes_on():
    seen = []
    measured, plain = client_app(seen, [measuring_mod()]), client_app(seen)
    strategy = NoiseStrategy(fedavg(fraction_evaluate=0.0))
    with pytest.warns(RuntimeWarning, match="missing_metrics"):
        result = run(strategy, {1: measured, 2: measured, 3: plain}, rounds=1)
    noise = strategy.last.noise
    assert noise.flag == gf.FLAG_MISSING and "node 3" in noise.reason and math.isnan(noise.within)
    assert set(result.arrays.keys()) == set(make_net().state_dict())  # FedAvg still averaged


def test_corrupt_metrics_flag_the_round():
    def tamper(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id == 2:
            reply.content["metrics"]["gradnoise.sum_sq"] = 0.0
        return reply

    app = client_app([], [tamper, measuring_mod()])
    strategy = NoiseStrategy(fedavg(fraction_evaluate=0.0))
    with pytest.warns(RuntimeWarning, match="corrupt_metrics"):
        run(strategy, {1: app, 2: app, 3: app}, rounds=1)
    noise = strategy.last.noise
    assert noise.flag == gf.FLAG_CORRUPT and "node 2" in noise.reason and math.isnan(noise.between)


def test_error_replies_are_left_out_like_the_strategy_leaves_them():
    def crash(msg, context, call_next):
        if context.node_id == 3 and msg.metadata.message_type == "train":
            raise RuntimeError("client 3 fell over")
        return call_next(msg, context)

    seen = []
    app = client_app(seen, [crash, measuring_mod()])
    strategy = NoiseStrategy(fedavg(fraction_evaluate=0.0))
    run(strategy, {1: app, 2: app, 3: app}, rounds=1)
    assert sorted(strategy.last.node_ids) == [1, 2] and strategy.last.noise.ok
    assert sorted(strategy.last.noise.sizes) == list(SIZES[:2])


# ------------------------------------------------------------ the bare aggregation fn
def test_train_metrics_aggr_fn_alone():
    """``FedAvg(train_metrics_aggr_fn=aggregate_train_metrics)``: the same numbers. The
    strategy averages the mean-gradient arrays into the global model (use NoiseStrategy to
    avoid that); the mod removes them before loading the next round's weights."""
    seen = []
    app = client_app(seen, [measuring_mod()])
    strategy = fedavg(fraction_evaluate=0.0, train_metrics_aggr_fn=aggregate_train_metrics)
    result = run(strategy, {1: app, 2: app, 3: app})
    for r in (1, 2):
        truth, direct = oracle_round(seen, r)
        m = result.train_metrics_clientapp[r]
        assert m["gradnoise.ok"] == 1 and "train_loss" in m and "gradnoise.n" not in m
        for attr, key in KEYS:
            assert m["gradnoise." + attr] == pytest.approx(truth[key], rel=REL), attr


# ------------------------------------------------------------------------ packaging
def test_flower_is_imported_only_on_use():
    code = ("import sys, gradnoise.integrations.flower as f\n"
            "assert not any(m.split('.')[0] == 'flwr' for m in sys.modules)\n"
            "f.NoiseStrategy\nassert 'flwr' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_flower_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)
    with pytest.raises(ImportError, match=r"pip install gradnoise\[flower\]"):
        gf.load_flwr()
