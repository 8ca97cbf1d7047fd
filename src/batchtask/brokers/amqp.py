"""taskiq-aio-pika: ``AioPikaBroker`` (RabbitMQ, AMQP 0-9-1).

- Acks: a batch's deliveries are acked with one ``basic.ack(multiple=True)``
  where that covers no unfinished delivery (`Amqp.ack_many`): every
  delivery of the worker is noted in order, per channel (`Amqp.noted`);
  acking a batch acks, with one frame, the longest run of its deliveries that
  starts at the channel's oldest unacked one; the batch's other deliveries
  (an older one is still unfinished) are acked one by one, so no ack waits.
  Acks of one channel are sent in the order they were planned, so a
  ``multiple`` ack never covers a tag that is also acked alone. Messages of
  taskiq's own path are acked through the same tracker (`Amqp.stock_message`).
- A delivery was delivered before when AMQP's ``redelivered`` flag says so.
- ``AioPikaBroker(qos=N)`` caps the unacknowledged messages of one worker.

The broker and its subclasses (recognised by class name and module, so
batchtask imports without taskiq-aio-pika installed).
"""

import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from taskiq import AckableMessage, AsyncBroker
from taskiq.acks import AckController

from batchtask.brokers._base import (
    DEFAULTS,
    AckPairs,
    Delivery,
    Options,
    PerMessage,
    RawAck,
    UnackedCap,
    ack_each,
)


class Amqp(PerMessage):
    """taskiq-aio-pika's ``AioPikaBroker`` (see the module)."""

    family: ClassVar[str] = "amqp"
    private_names: ClassVar[tuple[str, ...]] = (
        "AioPikaBroker._qos: the prefetch count (checked at start)",
        "aio_pika.message.IncomingMessage.ack, .delivery_tag, .channel, "
        ".redelivered: a delivery's ack as taskiq-aio-pika hands it out",
        "AioPikaBroker._delay_queue, ._delayed_message_exchange_plugin: whether "
        "its kick honours a delay label",
    )

    def __init__(self, broker: AsyncBroker, options: Options = DEFAULTS) -> None:
        """Track no delivery yet."""
        super().__init__(broker, options)
        self._channels: dict[int, _Channel] = {}
        self.round_trips = 0
        """``basic.ack`` frames sent so far (for tests and benchmarks)."""

    def noted(self, data: Delivery) -> None:
        """Note one delivery, in order, if acks are grouped."""
        if self.options.group_acks and isinstance(data, AckableMessage):
            self.delivered(data.ack)

    def delivered(self, ack: RawAck | None) -> bool:
        """Note one delivery, by its ack; False if it is not aio-pika's."""
        target = _amqp_target(ack)
        if target is None:
            return False
        channel, tag = target
        state = self._channels.get(id(channel))
        if state is None or state.channel is not channel:
            state = self._channels[id(channel)] = _Channel(channel)
        state.unacked[tag] = None
        return True

    def redelivered(self, data: Delivery) -> bool | None:
        """AMQP's ``redelivered`` flag."""
        if not isinstance(data, AckableMessage):
            return False
        message = getattr(data.ack, "__self__", None)
        if message is None or type(message).__module__ != "aio_pika.message":
            return False
        return bool(getattr(message, "redelivered", False))

    def stock_message(self, data: AckableMessage) -> AckableMessage:
        """A noted delivery, acked through the tracker on taskiq's path too.

        So that a batch's ``multiple=True`` ack never covers it unfinished.
        """
        target = _amqp_target(data.ack)
        state = None if target is None else self._channels.get(id(target[0]))
        if target is None or state is None or target[1] not in state.unacked:
            return data
        return AckableMessage.model_construct(data=data.data, ack=self.wrap(data.ack))

    def wrap(self, ack: RawAck) -> Callable[[], Awaitable[None]]:
        """One delivery's ack, sent through this tracker (for taskiq's own path)."""
        controller = AckController(ack)

        async def tracked_ack() -> None:
            (error,) = await self.ack_many([(controller, ack)])
            if error is not None:
                raise error

        return tracked_ack

    async def ack_many(self, acks: AckPairs) -> list[BaseException | None]:
        """Ack the deliveries not acked yet; return each one's error, or None."""
        errors: list[BaseException | None] = [None] * len(acks)
        by_channel: dict[int, list[tuple[int, int]]] = {}
        alone: list[int] = []
        for index, (controller, raw) in enumerate(acks):
            if controller.is_acked:
                continue
            target = _amqp_target(raw)
            state = None if target is None else self._channels.get(id(target[0]))
            if target is None or state is None or target[1] not in state.unacked:
                alone.append(index)
            else:
                by_channel.setdefault(id(target[0]), []).append((index, target[1]))
        for key, members in by_channel.items():
            state = self._channels[key]
            tags = {tag for _, tag in members}
            covered: list[int] = []
            for tag in state.unacked:
                if tag not in tags:
                    break
                covered.append(tag)
            for tag in tags:
                del state.unacked[tag]
            single = sorted(tags.difference(covered))
            try:
                async with state.lock:
                    if covered:
                        self.round_trips += 1
                        await state.channel.basic_ack(covered[-1], multiple=True)
                    for tag in single:
                        self.round_trips += 1
                        await state.channel.basic_ack(tag)
            except Exception as exc:
                for index, _ in members:
                    errors[index] = copy.copy(exc)
                continue
            for index, _ in members:
                acks[index][0].is_acked = True
        for index, error in zip(
            alone, await ack_each([acks[i][0] for i in alone]), strict=True
        ):
            errors[index] = error
        return errors

    def unacked_cap(self) -> UnackedCap | None:
        """``AioPikaBroker(qos=N)``."""
        qos = getattr(self.broker, "_qos", None)
        if not isinstance(qos, int) or isinstance(qos, bool):
            return None
        return UnackedCap(
            qos, f"AioPikaBroker(qos={qos})", "AioPikaBroker(..., qos={n})"
        )

    def delays(self) -> bool:
        """Whether ``kick`` delays a message by its ``delay`` label.

        With a delay queue or the delayed-message exchange it does; without
        either it refuses the label.
        """
        return getattr(self.broker, "_delay_queue", None) is not None or (
            getattr(self.broker, "_delayed_message_exchange_plugin", False) is True
        )

    def changes(self) -> list[str]:
        """What the checks need and did not find."""
        needed = ("_qos", "_delay_queue", "_delayed_message_exchange_plugin")
        return [
            f"AioPikaBroker.{name}" for name in needed if not hasattr(self.broker, name)
        ]


class _Channel:
    """One AMQP channel's deliveries not acked yet, oldest first."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.unacked: dict[int, None] = {}
        self.lock = asyncio.Lock()


def _amqp_target(ack: RawAck | None) -> tuple[Any, int] | None:
    """(aiormq channel, delivery tag) of an aio-pika message's ``ack``, or None."""
    message = getattr(ack, "__self__", None)
    if message is None or type(message).__module__ != "aio_pika.message":
        return None
    if getattr(ack, "__name__", None) != "ack":
        return None
    tag = getattr(message, "delivery_tag", None)
    channel = getattr(message, "channel", None)
    if not isinstance(tag, int) or channel is None:
        return None
    return channel, tag
