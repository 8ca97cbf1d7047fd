"""taskiq-nats: ``PullBasedJetStreamBroker`` and ``PushBasedJetStreamBroker``.

- Acks: a batch's acks are sent one after another in one task: each only
  adds a frame to the client's outgoing buffer, which is flushed once after
  them (one write, no round trip each).
- A delivery was delivered before when JetStream's delivery count
  (``metadata.num_delivered``) is above 1.
- The consumer's ``ack_wait`` (default `DEFAULT_ACK_WAIT`) hands a message
  left unacknowledged that long to another consumer.

The brokers and their subclasses (recognised by class name and module, so
batchtask imports without taskiq-nats installed).
"""

from typing import ClassVar

from taskiq import AckableMessage

from batchtask.brokers._base import AckPairs, Delivery, PerMessage

DEFAULT_ACK_WAIT = 30.0
"""Seconds: a NATS JetStream consumer's ``ack_wait`` when none is configured."""


class JetStream(PerMessage):
    """taskiq-nats's JetStream brokers (see the module)."""

    family: ClassVar[str] = "nats"
    private_names: ClassVar[tuple[str, ...]] = (
        "nats.aio.msg.Msg.ack, .metadata.num_delivered: a delivery's ack as "
        "taskiq-nats hands it out",
    )

    def redelivered(self, data: Delivery) -> bool | None:
        """JetStream's delivery count above 1."""
        if not isinstance(data, AckableMessage):
            return False
        message = getattr(data.ack, "__self__", None)
        if message is None or not type(message).__module__.startswith("nats."):
            return False
        try:
            return int(message.metadata.num_delivered) > 1
        except Exception:
            return False

    async def ack_many(self, acks: AckPairs) -> list[BaseException | None]:
        """Ack the messages not acked yet, in order; return each one's error."""
        if not self.options.group_acks:
            return await super().ack_many(acks)
        errors: list[BaseException | None] = [None] * len(acks)
        for index, (controller, _) in enumerate(acks):
            try:
                await controller.ack()
            except Exception as exc:
                errors[index] = exc
        return errors

    def redelivery_window(self) -> tuple[float, str] | None:
        """The consumer's ``ack_wait``."""
        config = getattr(self.broker, "consumer_config", None)
        ack_wait = getattr(config, "ack_wait", None) or DEFAULT_ACK_WAIT
        if isinstance(ack_wait, (int, float)):
            return float(ack_wait), f"the NATS consumer's ack_wait={ack_wait:g}"
        return None
