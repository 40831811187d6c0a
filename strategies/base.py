"""What every fedapp strategy adds to Flower's FedAvg: the guard on valid replies and a typed resume state.

Flower's ``FedAvg`` samples the nodes, sends the messages and averages. A fedapp strategy
also says which method it runs, refuses to move the model on too few valid replies, and
gives the server what a resume needs beyond the weights (``state()`` / ``restore()``).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedapp.log import log
from fedapp.privacy.accounting import PrivacyAccount
from fedapp.protocol.metrics import mean_std_over_clients, weighted_mean_over_clients
from strategies.privacy import ClientLevelDP
from strategies.robust import Aggregation
from strategies.validation import by_node, canonical_metrics, weight_problem

StrategyState = dict[str, Any]  # plain Python values: torch.save'd in the round checkpoint


class FedappStrategy(FedAvg):
    """FedAvg with a method name, a resume state, and the replies guard of ``strategy.*``."""

    method = "full"

    def __init__(self, *args: Any, max_num_examples: int = 10_000_000, min_valid_replies: int = 1,
                 aggregation: Aggregation = "mean", trim_fraction: float = 0.2,
                 privacy: ClientLevelDP | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", weighted_mean_over_clients)
        kwargs.setdefault("evaluate_metrics_aggr_fn", weighted_mean_over_clients)
        super().__init__(*args, **kwargs)
        self.max_num_examples, self.min_valid_replies = max_num_examples, min_valid_replies
        self.aggregation: Aggregation = "unweighted-mean" if privacy is not None else aggregation
        self.trim_fraction, self.privacy = trim_fraction, privacy

    def state(self) -> StrategyState:
        """What a resume needs beyond the weights: the privacy account, where there is one."""
        return {"privacy": self.privacy.account.state()} if self.privacy is not None else {}

    def restore(self, state: StrategyState) -> None:
        """Take back what :meth:`state` gave, from a round checkpoint."""
        if self.privacy is not None and "privacy" in state:
            self.privacy.account = PrivacyAccount.from_state(state["privacy"])

    def valid_evaluate_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The evaluate replies that hold one MetricRecord with a usable weight, their metrics made
        consistent; the others are dropped with their reason (Flower would end the run on them)."""
        answered, _ = self._check_and_log_replies(replies, is_train=False, validate=False)
        valid = []
        for reply in by_node(answered):
            problem = weight_problem(reply.content, self.weighted_by_key, self.max_num_examples)
            if problem:
                log(WARNING, "dropping evaluate reply from node %d in round %d: %s",
                    reply.metadata.src_node_id, server_round, problem)
            else:
                valid.append(reply)
        canonical_metrics([m.content for m in valid], common=self.evaluate_metrics_aggr_fn is not mean_std_over_clients)
        return valid

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = self.valid_evaluate_replies(server_round, replies)
        if not valid:
            return None
        return self.evaluate_metrics_aggr_fn([RecordDict(dict(m.content.metric_records)) for m in valid],
                                             self.weighted_by_key)

    def too_few_valid(self, server_round: int, answered: int, valid: int) -> bool:
        """True (and logged) when replies came but fewer than ``min-valid-replies`` passed the checks."""
        if answered and valid < self.min_valid_replies:
            log(WARNING, "round %d keeps the previous model: %d valid replies, strategy.min-valid-replies = %d",
                server_round, valid, self.min_valid_replies)
            return True
        return False
